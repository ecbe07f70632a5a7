//! `drydock du` and the GC estimate on an optimised store (`nix-store --optimise`: files are
//! hard links into `.links`): byte counts agree with GNU `du` (which counts an inode once), and
//! a dead path's file that a live path shares is not counted as freeable.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Drydock, nix_store};

fn gnu_du(paths: &[PathBuf], count_links: bool) -> u64 {
    let mut cmd = Command::new("du");
    cmd.args(["-s", "-c", "-B1"]);
    if count_links {
        cmd.arg("--count-links");
    }
    let out = cmd.args(paths).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let total = text.lines().last().unwrap();
    total.split_whitespace().next().unwrap().parse().unwrap()
}

fn store_entries(root: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let store = root.join("nix/store");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".links" && pred(n))
        .map(|n| store.join(n))
        .collect();
    v.sort();
    v
}

#[test]
fn du_counts_links_once_and_estimate_skips_shared_inodes() {
    let dir = common::scratch("gc-du");
    let root = dir.join("root");
    let state = dir.join("state");
    // 64 KiB files: `x` shared by a live and a dead path, `y` only in a dead path.
    let fill = |c: &str| {
        format!(
            "mkdir $out; i=0; while [ $i -lt 1024 ]; do printf '{}' >> $out/f; i=$((i+1)); done",
            c.repeat(64)
        )
    };
    let expr = format!(
        r#"let {p}
  live = mk "vm-test-run-live" [] "{x}";
  deadx = mk "vm-test-run-deadx" [] "{x} ; echo dx > $out/tag";
  deady = mk "nixos-test-driver-deady" [] "{y}";
in {{ inherit live deadx deady; }}"#,
        p = common::PRELUDE,
        x = fill("x"),
        y = fill("y"),
    );
    let result = dir.join("result");
    let file = dir.join("du.nix");
    std::fs::write(&file, &expr).unwrap();
    let st = Command::new("nix-build")
        .arg("--store")
        .arg(&root)
        .arg(&file)
        .args(common::NIX_BUILD_OPTIONS)
        .args(["-A", "live", "-o"])
        .arg(&result)
        .status()
        .unwrap();
    assert!(st.success());
    common::nix_build(&root, "du", &expr, None);
    nix_store(&root, &["--optimise"]);

    // Everything classified as a test artifact, plus the (empty) state dir.
    let rep = Drydock::on(&root, &state)
        .json()
        .args(["du"])
        .run()
        .ok()
        .stdout_json();
    let artifacts = store_entries(&root, |n| {
        n.contains("vm-test-run") || n.contains("nixos-test-driver") || n.ends_with(".drv")
    });
    let ours = rep["total"].as_u64().unwrap();
    // The state dir holds the runs database drydock had open (its WAL goes away on exit),
    // so the store part is compared exactly.
    let state_bytes = rep["state_dir"].as_u64().unwrap();
    assert!(state_bytes > 0);
    assert_eq!(ours - state_bytes, gnu_du(&artifacts, false), "{rep}");
    assert!(
        gnu_du(&artifacts, true) > ours - state_bytes,
        "links were shared, so counting them differs"
    );
    let runs = store_entries(&root, |n| n.contains("vm-test-run") && !n.ends_with(".drv"));
    assert_eq!(
        rep["by_class"]["test_run"].as_u64().unwrap(),
        gnu_du(&runs, false)
    );
    assert!(rep["by_class"]["test_driver"].as_u64().unwrap() >= 65536);

    // The dead set: deadx, deady and drvs. Freeable: y's 64 KiB, not x's (live shares it).
    let plan = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--all", "--dry-run"])
        .run()
        .ok()
        .stdout_json();
    let bytes = plan["bytes"].as_u64().unwrap();
    assert!(bytes >= 65536, "{plan}");
    assert!(bytes < 2 * 65536, "the shared inode was counted: {plan}");
    let paths: Vec<String> = serde_json::from_value(plan["paths"].clone()).unwrap();
    assert!(paths.iter().any(|p| p.ends_with("vm-test-run-deadx")));
    assert!(!paths.iter().any(|p| p.ends_with("vm-test-run-live")));
}
