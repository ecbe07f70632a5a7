//! `drydock track`, `runs`, `runs show` and `gc` of selected runs on a real chroot store:
//! attribution through the derivation closure (a concurrent untracked build is not claimed),
//! exit codes passed through, "why is this alive", deletion through Nix, bad input.

use crate::common;

use std::path::Path;

use common::{Checks, Drydock, nix_store, valid_paths};

fn expr(tag: &str) -> String {
    format!(
        r#"let {p}
  driver = mk "nixos-test-driver-{tag}" [] "echo driver > $out";
  system = mk "nixos-system-{tag}" [] "echo system > $out";
  run = mk "vm-test-run-{tag}" [ driver system ] "echo ${{driver}} ${{system}} > $out";
in run"#,
        p = common::PRELUDE
    )
}

#[test]
fn track_runs_and_gc_selected_runs() {
    // One store and one runs database go through tracking, queries, bad input and a
    // collection, in that order. The checks of each answer are soft (common::Checks), so one
    // wrong answer does not hide the others; the tracked builds, the `runs` list the checks
    // read and the collection itself stay hard.
    let mut checks = Checks::new();
    let dir = common::scratch("track-gc");
    let root = dir.join("root");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    for tag in ["one", "two", "other"] {
        std::fs::write(dir.join(format!("{tag}.nix")), expr(tag)).unwrap();
    }
    // An untracked build of "other" lands inside the tracked command's window (its output is
    // not printed), like a concurrent build in another terminal.
    let script = format!(
        "{} --no-out-link >/dev/null 2>&1; {} --no-out-link",
        common::nix_build_cmd(&root, &dir.join("other.nix"), ""),
        common::nix_build_cmd(&root, &dir.join("one.nix"), "")
    );
    let out = Drydock::on(&root, &state)
        .args(["track", "--name", "one", "--", "sh", "-c", &script])
        .run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    checks.check("the tracked command's stdout passes through", || {
        let printed = String::from_utf8(out.output.stdout).unwrap();
        assert!(
            printed.trim().ends_with("vm-test-run-one"),
            "stdout passes through: {printed}"
        );
    });

    // A second run, rooted by its result link.
    let link = dir.join("result-two");
    // Run directly (no shell), with the out-link named by `-o`.
    let (root_s, two_s, link_s) = (
        root.display().to_string(),
        dir.join("two.nix").display().to_string(),
        link.display().to_string(),
    );
    let mut a = vec!["track", "--", "nix-build", "--store", &root_s, &two_s];
    a.extend(common::NIX_BUILD_OPTIONS);
    a.extend(["-o", &link_s]);
    Drydock::on(&root, &state).args(&a).run().ok();
    checks.check("exit codes pass through", || {
        let out = Drydock::on(&root, &state)
            .args(["track", "--name", "fails", "--", "sh", "-c", "exit 3"])
            .run();
        assert_eq!(out.status.code(), Some(3));
    });

    let runs = Drydock::on(&root, &state)
        .json()
        .args(["runs"])
        .run()
        .ok()
        .stdout_json();
    let list = runs["runs"].as_array().unwrap();
    checks.check("runs lists the three runs", || {
        assert_eq!(list.len(), 3);
        assert_eq!(list[0]["name"], "one");
        assert_eq!(list[2]["exit_status"], 3);
    });
    checks.check(
        "run 1 claims 3 drvs and 3 outputs, nothing of other",
        || {
            let show = Drydock::on(&root, &state)
                .json()
                .args(["runs", "show", "1"])
                .run()
                .ok()
                .stdout_json();
            let paths = show["paths"].as_array().unwrap();
            let names: Vec<&str> = paths.iter().map(|p| p["path"].as_str().unwrap()).collect();
            assert_eq!(paths.len(), 6, "{names:?}");
            assert!(names.iter().all(|n| n.contains("-one")), "{names:?}");
            let classes: Vec<&str> = paths.iter().map(|p| p["class"].as_str().unwrap()).collect();
            for c in ["test_run", "test_driver", "vm_system", "derivation"] {
                assert!(classes.contains(&c), "{classes:?}");
            }
            assert!(paths.iter().all(|p| p["status"] == "reclaimable"), "{show}");
            assert!(list[0]["reclaimable"].as_u64().unwrap() > 0);
        },
    );
    checks.check(
        "run 2 is alive through its result link: root and chain named",
        || {
            let show2 = Drydock::on(&root, &state)
                .json()
                .args(["runs", "show", "2"])
                .run()
                .ok()
                .stdout_json();
            let alive: Vec<&serde_json::Value> = show2["paths"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["status"] == "alive")
                .collect();
            assert_eq!(alive.len(), 6, "{show2}");
            let driver = alive.iter().find(|p| p["class"] == "test_driver").unwrap();
            assert_eq!(driver["why"]["root"], link.display().to_string());
            assert_eq!(driver["why"]["root_kind"], "indirect");
            let chain = driver["why"]["chain"].as_array().unwrap();
            assert!(chain[0].as_str().unwrap().ends_with("vm-test-run-two"));
            assert!(
                chain
                    .last()
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .ends_with("nixos-test-driver-two")
            );
        },
    );

    checks.check(
        "du by run: each run's claimed paths, hard links once",
        || {
            let du = Drydock::on(&root, &state)
                .json()
                .args(["du"])
                .run()
                .ok()
                .stdout_json();
            let by_run = du["by_run"].as_array().unwrap();
            assert_eq!(by_run.len(), 3, "{du}");
            assert!(by_run[0][2].as_u64().unwrap() > 0 && by_run[1][2].as_u64().unwrap() > 0);
            assert_eq!(by_run[2][2], 0, "the failing run claimed nothing");
            assert!(du["by_class"]["test_driver"].as_u64().unwrap() > 0);
        },
    );

    // Bad input: exit 2, nothing deleted.
    let before = valid_paths(&root);
    for args in [
        &["gc", "--run", "99"][..],
        &["gc"],
        &["gc", "--older-than", "7y", "--dry-run"],
        &["runs", "show", "42"],
    ] {
        checks.check(&format!("{args:?} is bad input"), || {
            assert_eq!(
                Drydock::on(&root, &state).args(args).run().status.code(),
                Some(2)
            );
        });
    }
    checks.check("a directory that is not a store is bad input", || {
        let not_store = dir.join("not-a-store");
        std::fs::create_dir_all(&not_store).unwrap();
        let o = Drydock::on(&not_store, &state).args(["gc", "--all"]).run();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("not a Nix store"));
    });
    checks.check("a runs database that is not one is bad input", || {
        let bad_state = dir.join("bad-state");
        std::fs::create_dir_all(&bad_state).unwrap();
        std::fs::write(bad_state.join("runs.sqlite"), vec![b'z'; 4096]).unwrap();
        let o = Drydock::on(&root, &bad_state)
            .args(["gc", "--keep-last", "0"])
            .run();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("runs.sqlite"));
    });
    checks.check("bad input deleted nothing", || {
        assert_eq!(valid_paths(&root), before);
    });

    // gc of runs 1 and 2: run 1's paths go, run 2's are kept (alive), "other" stays.
    checks.check("the plan of gc of runs 1 and 2", || {
        let plan = Drydock::on(&root, &state)
            .json()
            .args(["gc", "--run", "1", "--run", "2", "--dry-run"])
            .run()
            .ok()
            .stdout_json();
        let planned: Vec<String> = serde_json::from_value(plan["paths"].clone()).unwrap();
        assert_eq!(planned.len(), 6);
        assert!(planned.iter().all(|p| p.contains("-one")));
        assert_eq!(plan["kept"].as_array().unwrap().len(), 6);
        assert!(plan["bytes"].as_u64().unwrap() > 0);
    });
    let done = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--run", "1", "--run", "2"])
        .run()
        .ok()
        .stdout_json();
    checks.check("gc of runs 1 and 2 deletes run 1's paths only", || {
        assert_eq!(done["deleted"].as_array().unwrap().len(), 6, "{done}");
        let after = valid_paths(&root);
        assert!(after.iter().all(|p| !p.contains("-one")));
        assert!(after.iter().any(|p| p.ends_with("vm-test-run-other")));
        assert!(after.iter().any(|p| p.ends_with("vm-test-run-two")));
        nix_store(&root, &["--verify", "--check-contents"]);
    });
    checks.check("run 1 is recorded collected", || {
        let show = Drydock::on(&root, &state)
            .json()
            .args(["runs", "show", "1"])
            .run()
            .ok()
            .stdout_json();
        assert!(
            show["paths"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["status"] == "deleted")
        );
        assert!(show["run"]["collected_at"].is_i64());
    });
}

#[test]
fn pins_of_vm_runs_are_roots_until_collected() {
    let dir = common::scratch("track-pins");
    let root = dir.join("root");
    let state = dir.join("state");
    let out = common::nix_build(&root, "vm", &expr("vm"), None);
    let layout = drydock_gc::StoreLayout::chroot(&root);
    let top = layout.parse(&out[0]).unwrap();
    // The VM side's API: a run of kind vm with an artifact and a pinned closure.
    let vm_state = state.join("vms/t1");
    {
        let db = drydock_gc::RunsDb::open(&state).unwrap();
        let id = db
            .begin_run(
                &layout,
                "t1",
                &["vm".into(), "run".into()],
                drydock_gc::RunKind::Vm,
            )
            .unwrap();
        db.add_paths(id, &[(out[0].clone(), drydock_gc::classify(&top), 1)])
            .unwrap();
        std::fs::create_dir_all(&vm_state).unwrap();
        std::fs::write(vm_state.join("overlay.qcow2"), b"disk").unwrap();
        db.add_artifact(id, drydock_gc::ArtifactKind::StateDir, &vm_state)
            .unwrap();
        db.pin(&layout, id, &top).unwrap();
        db.finish_run(id, Some(0)).unwrap();
    }
    // Nix itself sees the pin.
    let dead = common::nix_print_dead(&root);
    assert!(!dead.contains(&out[0]));
    let plan = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--all", "--dry-run"])
        .run()
        .ok()
        .stdout_json();
    assert!(
        !plan["paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == &out[0])
    );
    // A VM still running (unfinished run with a pin) cannot be selected, and filters skip it.
    let other = common::nix_build(&root, "vm2", &expr("vm2"), None);
    let other_top = layout.parse(&other[0]).unwrap();
    {
        let db = drydock_gc::RunsDb::open(&state).unwrap();
        let id = db
            .begin_run(&layout, "t2", &["vm".into()], drydock_gc::RunKind::Vm)
            .unwrap();
        assert_eq!(id, 2);
        db.add_paths(
            id,
            &[(other[0].clone(), drydock_gc::classify(&other_top), 1)],
        )
        .unwrap();
        db.pin(&layout, id, &other_top).unwrap();
    }
    let o = Drydock::on(&root, &state)
        .args(["gc", "--run", "2", "--dry-run"])
        .run();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("still running"));
    let plan = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--keep-last", "0", "--dry-run"])
        .run()
        .ok()
        .stdout_json();
    assert_eq!(plan["runs"], serde_json::json!([1]));
    // Selecting the run ignores its own pin, unpins it and removes its VM state.
    let done = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--run", "1"])
        .run()
        .ok()
        .stdout_json();
    assert_eq!(done["deleted"].as_array().unwrap().len(), 1, "{done}");
    assert!(!vm_state.exists());
    assert!(!valid_paths(&root).contains(&out[0]));
    assert!(
        valid_paths(&root).contains(&other[0]),
        "the running VM's pin held"
    );
    nix_store(&root, &["--verify"]);
}

#[test]
fn track_passes_the_output_and_exit_code_through() {
    // Moved from drydock-gc's unit tests (they run no external program): the command's
    // stdout reaches ours as it printed it, and its exit code (128 + signal when killed) is
    // drydock's; a command that cannot start is bad input.
    let dir = common::scratch("track-passthrough");
    let root = dir.join("root");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let run = |args: &[&str]| common::Drydock::on(&root, &state).args(args).run();
    let out = run(&["track", "--", "sh", "-c", "echo hi; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"hi\n");
    let out = run(&["track", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = run(&["track", "--", "/nonexistent/cmd"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn track_forwards_ctrl_c_and_passes_the_exit_code() {
    let dir = common::scratch("track-sigint");
    let root = dir.join("root");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let ready = dir.join("ready");
    let pidfile = dir.join("sleep.pid");
    let script = format!(
        "trap 'exit 42' INT; sleep 60 & echo $! > {}; touch {}; wait",
        pidfile.display(),
        ready.display()
    );
    let mut child = Drydock::on(&root, &state)
        .args(["track", "--name", "interrupted", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let start = std::time::Instant::now();
    while !ready.exists() {
        assert!(start.elapsed().as_secs() < 30, "the command never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SIGINT to drydock alone (not its process group): it must reach the command.
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(42));
    // The orphaned `sleep` is still alive and holds the output pipe: drydock returned
    // without waiting for it. Then end it.
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let db = drydock_gc::RunsDb::open(&state).unwrap();
    assert_eq!(db.run(1).unwrap().exit_status, Some(42));
}
