//! One state directory, two real chroot stores: a run belongs to the store it was made in.
//! `runs`, `runs show`, `du` and `gc` look only at the current store's runs (the others are
//! counted, never lost), another store's run named by id is bad input, and a collection in one
//! store leaves the other store's paths (even the same logical paths) alone.

use crate::common;

use std::path::{Path, PathBuf};

use common::{Checks, Drydock, nix_store, valid_paths};

/// A test run depending on a driver that both stores build (the same logical path in each).
fn expr(tag: &str) -> String {
    format!(
        r#"let {p}
  shared = mk "nixos-test-driver-shared" [] "echo shared > $out";
  run = mk "vm-test-run-{tag}" [ shared ] "echo ${{shared}} {tag} > $out";
in run"#,
        p = common::PRELUDE
    )
}

/// The store's id as drydock records it: the resolved physical store directory.
fn store_id(root: &Path) -> String {
    std::fs::canonicalize(root)
        .unwrap()
        .join("nix/store")
        .display()
        .to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every registered path of `root` still there on disk, and Nix's own check passes.
fn intact(root: &Path, paths: &[String]) {
    let valid = valid_paths(root);
    for p in paths {
        assert!(valid.contains(p), "{p} is no longer valid in {root:?}");
        let phys = root.join(p.trim_start_matches('/'));
        assert!(phys.exists(), "{phys:?} is gone");
    }
    nix_store(root, &["--verify"]);
}

#[test]
fn runs_belong_to_their_store() {
    // Two stores and one runs database go through queries, refusals and collections, in
    // that order. The checks of each answer are soft (common::Checks), so one wrong answer
    // does not hide the others; the tracked builds, the paths the checks compare with, the
    // unfinished collection in B and the collections themselves stay hard.
    let mut checks = Checks::new();
    let dir = common::scratch("gc-stores");
    let (a, b): (PathBuf, PathBuf) = (dir.join("a"), dir.join("b"));
    let state = dir.join("state");
    for (root, tag) in [(&a, "a"), (&b, "b")] {
        std::fs::create_dir_all(root).unwrap();
        let file = dir.join(format!("{tag}.nix"));
        std::fs::write(&file, expr(tag)).unwrap();
        let cmd = common::nix_build_cmd(root, &file, "--no-out-link");
        let name = format!("in-{tag}");
        Drydock::on(root, &state)
            .args(["track", "--name", &name, "--", "sh", "-c", &cmd])
            .run()
            .ok();
    }
    let (id_a, id_b) = (store_id(&a), store_id(&b));
    let (paths_a, paths_b) = (valid_paths(&a), valid_paths(&b));
    checks.check("the driver is in both stores", || {
        assert_eq!(paths_a.len(), 4, "{paths_a:?}");
        let shared: Vec<&String> = paths_a.iter().filter(|p| paths_b.contains(p)).collect();
        assert_eq!(
            shared.len(),
            2,
            "the driver and its derivation are in both stores"
        );
    });

    // `runs` in each store: its own run only, and one line naming the other store.
    for (root, own, other, other_root) in [(&a, "in-a", "in-b", &b), (&b, "in-b", "in-a", &a)] {
        checks.check(&format!("runs in the store of {own}"), || {
            let text = Drydock::on(root, &state)
                .args(["runs"])
                .run()
                .ok()
                .stdout_str();
            assert!(text.lines().any(|l| l.contains(own)), "{text}");
            assert!(!text.lines().any(|l| l.contains(other)), "{text}");
            let last = text.lines().last().unwrap();
            assert!(
                last.contains("1 run of other stores not shown")
                    && last.contains(&store_id(other_root))
                    && last.contains(&format!(
                        "--store {}",
                        other_root.canonicalize().unwrap().display()
                    )),
                "{text}"
            );
        });
    }
    checks.check("runs --json counts the other store's runs", || {
        let runs_a = Drydock::on(&a, &state)
            .json()
            .args(["runs"])
            .run()
            .ok()
            .stdout_json();
        let list = runs_a["runs"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{runs_a}");
        assert_eq!(list[0]["id"], 1);
        assert_eq!(list[0]["store"], id_a.as_str());
        assert_eq!(list[0]["paths"], 4);
        assert_eq!(
            runs_a["other_stores"],
            serde_json::json!([{ "store": id_b, "runs": 1 }])
        );
    });

    // `runs show` of the other store's run: bad input naming its store.
    checks.check("runs show of the other store's run", || {
        let o = Drydock::on(&a, &state).args(["runs", "show", "2"]).run();
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(&id_b), "{}", stderr(&o));
        assert_eq!(
            Drydock::on(&b, &state)
                .json()
                .args(["runs", "show", "2"])
                .run()
                .ok()
                .stdout_json()["run"]["id"],
            2
        );
    });

    // `du` by run: this store's run only.
    checks.check("du by run", || {
        let du = Drydock::on(&a, &state)
            .json()
            .args(["du"])
            .run()
            .ok()
            .stdout_json();
        let by_run = du["by_run"].as_array().unwrap();
        assert_eq!(by_run.len(), 1, "{du}");
        assert_eq!(by_run[0][0], 1);
    });

    // `gc --run` of the other store's run: bad input, nothing deleted in either store.
    for args in [
        &["gc", "--run", "2"][..],
        &["gc", "--run", "2", "--dry-run"],
    ] {
        checks.check(&format!("{args:?} of the other store's run"), || {
            let o = Drydock::on(&a, &state).args(args).run();
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(&id_b), "{}", stderr(&o));
        });
    }
    checks.check("nothing deleted in either store", || {
        intact(&a, &paths_a);
        intact(&b, &paths_b);
    });

    // Filters count and select only this store's runs.
    checks.check("filters count and select only this store's runs", || {
        let plan = Drydock::on(&b, &state)
            .json()
            .args(["gc", "--older-than", "0s", "--dry-run"])
            .run()
            .ok()
            .stdout_json();
        assert_eq!(plan["runs"], serde_json::json!([2]), "{plan}");
        let plan = Drydock::on(&a, &state)
            .json()
            .args(["gc", "--keep-last", "1", "--dry-run"])
            .run()
            .ok()
            .stdout_json();
        assert_eq!(
            plan["runs"],
            serde_json::json!([]),
            "B's run does not count: {plan}"
        );
        let plan = Drydock::on(&a, &state)
            .json()
            .args(["gc", "--keep-last", "0", "--dry-run"])
            .run()
            .ok()
            .stdout_json();
        assert_eq!(plan["runs"], serde_json::json!([1]), "{plan}");
    });

    // A collection in B left unfinished (drydock killed): a `gc` in A cannot check B's paths
    // and leaves it to B.
    let b_event = {
        let db = drydock_gc::RunsDb::open(&state).unwrap();
        let run_b: drydock_gc::NameList = paths_b
            .iter()
            .filter(|p| p.ends_with("-vm-test-run-b"))
            .collect();
        db.begin_gc(&drydock_gc::StoreLayout::chroot(&b), "runs", &run_b, 1)
            .unwrap()
    };

    // A real collection in A: A's run goes, B's paths (the shared ones too) stay.
    let done = Drydock::on(&a, &state)
        .json()
        .args(["gc", "--keep-last", "0"])
        .run()
        .ok()
        .stdout_json();
    checks.check("a collection in A takes A's run, leaves B's paths", || {
        assert_eq!(done["runs"], serde_json::json!([1]), "{done}");
        assert_eq!(done["deleted"].as_array().unwrap().len(), 4, "{done}");
        assert!(valid_paths(&a).is_empty());
        nix_store(&a, &["--verify"]);
        intact(&b, &paths_b);
    });
    // B's run still has all its paths: what went in A is not recorded as gone in B.
    let db = drydock_gc::RunsDb::open(&state).unwrap();
    checks.check("what went in A is not recorded as gone in B", || {
        assert!(db.run(1).unwrap().collected_at.is_some());
        assert!(db.run(2).unwrap().collected_at.is_none());
        assert!(
            db.run_paths(2)
                .unwrap()
                .iter()
                .all(|p| p.gc_state.is_none())
        );
        assert!(
            db.gc_event_statuses()
                .unwrap()
                .contains(&(b_event, "running".to_owned()))
        );
    });
    // B's next collection reconciles it: nothing of it is gone.
    Drydock::on(&b, &state)
        .json()
        .args(["gc", "--keep-last", "5"])
        .run()
        .ok()
        .stdout_json();
    checks.check(
        "B's next collection reconciles it: nothing of it is gone",
        || {
            assert!(
                db.gc_event_statuses()
                    .unwrap()
                    .contains(&(b_event, "interrupted".to_owned()))
            );
            assert!(
                db.run_paths(2)
                    .unwrap()
                    .iter()
                    .all(|p| p.gc_state.is_none())
            );
            intact(&b, &paths_b);
            let runs_b = Drydock::on(&b, &state)
                .json()
                .args(["runs"])
                .run()
                .ok()
                .stdout_json();
            assert_eq!(runs_b["runs"][0]["live_paths"], 4, "{runs_b}");
            let show = Drydock::on(&b, &state)
                .json()
                .args(["runs", "show", "2"])
                .run()
                .ok()
                .stdout_json();
            assert!(
                show["paths"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|p| p["status"] == "reclaimable"),
                "{show}"
            );
        },
    );
}
