//! `gc` under stress: `kill -9` in the middle of a collection leaves the runs database
//! consistent and a second `gc` finishes; a build running while `gc --all` deletes keeps its
//! outputs and inputs (Nix's GC lock and temporary roots do their job).

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Drydock, nix_store, valid_paths};

/// An expression with `n` independent small test runs, each with a driver.
fn many(n: usize, tag: &str) -> String {
    let mut body = String::new();
    for i in 0..n {
        body.push_str(&format!(
            "  d{i} = mk \"nixos-test-driver-{tag}{i}\" [] \"echo {i} > $out\";\n  r{i} = mk \"vm-test-run-{tag}{i}\" [ d{i} ] \"echo ${{d{i}}} > $out\";\n"
        ));
    }
    let list: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    format!("let {}\n{body}in [ {} ]", common::PRELUDE, list.join(" "))
}

fn track_build(root: &Path, state: &Path, file: &Path) {
    common::track_ok(
        root,
        state,
        &common::nix_build_cmd(root, file, "--no-out-link"),
    );
}

fn deleted_count(state: &Path) -> usize {
    let Ok(db) = drydock_gc::RunsDb::open(state) else {
        return 0;
    };
    db.run_paths(1)
        .map(|v| {
            v.iter()
                .filter(|p| p.gc_state.as_deref() == Some("deleted"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn kill_9_during_gc_then_gc_again() {
    let dir = common::scratch("gc-kill9");
    let root = dir.join("root");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let file = dir.join("many.nix");
    std::fs::write(&file, many(25, "k")).unwrap();
    track_build(&root, &state, &file);
    let claimed = drydock_gc::RunsDb::open(&state)
        .unwrap()
        .run_paths(1)
        .unwrap();
    assert_eq!(claimed.len(), 100);

    // One path per nix-store call makes the collection long enough to interrupt.
    let mut child = Drydock::on(&root, &state)
        .args(["gc", "--run", "1"])
        .env("DRYDOCK_GC_BATCH", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let start = Instant::now();
    while deleted_count(&state) < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "gc made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "gc ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Let an orphaned nix-store finish its one path.
    std::thread::sleep(Duration::from_millis(500));

    let db = drydock_gc::RunsDb::open(&state).unwrap();
    assert_eq!(
        db.gc_event_statuses().unwrap(),
        vec![(1, "running".to_owned())]
    );
    let recorded = deleted_count(&state);
    assert!((5..100).contains(&recorded), "{recorded}");
    // What is recorded deleted really is gone.
    let valid = valid_paths(&root);
    for p in db.run_paths(1).unwrap() {
        if p.gc_state.as_deref() == Some("deleted") {
            assert!(
                !valid.contains(&p.path),
                "{} recorded deleted but valid",
                p.path
            );
        }
    }
    nix_store(&root, &["--verify"]);
    drop(db);

    let done = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--run", "1"])
        .run()
        .ok()
        .stdout_json();
    assert!(done["refused"].as_array().unwrap().is_empty(), "{done}");
    let valid = valid_paths(&root);
    assert!(valid.iter().all(|p| !p.contains("-k")), "{valid:?}");
    let db = drydock_gc::RunsDb::open(&state).unwrap();
    assert_eq!(
        db.gc_event_statuses().unwrap(),
        vec![(1, "interrupted".to_owned()), (2, "done".to_owned())]
    );
    assert!(
        db.run_paths(1)
            .unwrap()
            .iter()
            .all(|p| p.gc_state.as_deref() == Some("deleted"))
    );
    assert!(db.run(1).unwrap().collected_at.is_some());
    assert!(db.unfinished_gcs().unwrap().is_empty());
    nix_store(&root, &["--verify", "--check-contents"]);
}

#[test]
fn build_during_gc_all_keeps_its_outputs() {
    let dir = common::scratch("gc-concurrent");
    let root = dir.join("root");
    let state = dir.join("state");
    // Garbage to collect: 30 test runs whose drivers all use `shared`, so `shared` (which
    // the concurrent build will use too) comes in the last deletion batch.
    let garbage = many(30, "g")
        .replace("\" [] \"echo ", "\" [ shared ] \"echo ${shared} ")
        .replace(
            "in [",
            "  shared = mk \"shared-lib\" [] \"echo shared > $out\";\nin [ shared",
        );
    let outs = common::nix_build(&root, "garbage", &garbage, None);
    let shared = outs[0].clone();
    assert!(shared.ends_with("shared-lib"));

    let gc = Drydock::on(&root, &state)
        .args(["--json", "gc", "--all"])
        .env("DRYDOCK_GC_BATCH", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    // Wait until the collection is deleting, then build something that uses `shared`.
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "gc never started"
        );
        let started = state
            .join("runs.sqlite")
            .exists()
            .then(|| drydock_gc::RunsDb::open(&state).ok())
            .flatten()
            .and_then(|db| db.unfinished_gcs().ok())
            .and_then(|u| u.first().map(|g| g.planned.len()))
            .is_some_and(|left| left < 120);
        if started {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let newer = format!(
        "let {}\n  shared = mk \"shared-lib\" [] \"echo shared > $out\";\n  app = mk \"vm-test-run-new\" [ shared ] \"echo ${{shared}} > $out\";\nin app",
        common::PRELUDE
    );
    let result = dir.join("result");
    let built = common::nix_build(&root, "newer", &newer, Some(&result));
    let mut gc = gc;
    assert!(
        gc.try_wait().unwrap().is_none(),
        "the build did not overlap the collection"
    );
    let gc_out = gc.output();
    // Nix refused `shared` (now alive through the new build): reported, exit 1, not forced.
    assert_eq!(gc_out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&gc_out.stdout).unwrap();
    assert!(
        report["deleted"].as_array().unwrap().len() >= 120,
        "{report}"
    );
    let refused: Vec<String> = report["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect();
    // `shared`, and its .drv (kept by its now-live output: keep-derivations).
    assert_eq!(refused.len(), 2, "{report}");
    assert!(refused.contains(&shared), "{report}");
    assert!(
        refused.iter().all(|p| p.contains("-shared-lib")),
        "{report}"
    );
    let valid = valid_paths(&root);
    assert!(valid.contains(&built[0]));
    assert!(valid.contains(&shared), "the build's input survived");
    let store = root.join("nix/store");
    for p in [&built[0], &shared] {
        assert!(store.join(&p["/nix/store/".len()..]).exists());
    }
    nix_store(&root, &["--verify", "--check-contents"]);
    // And the store is still usable: the build is a no-op now.
    assert_eq!(
        common::nix_build(&root, "newer", &newer, Some(&result)),
        built
    );
}
