//! `drydock gc --all` against Nix's own collector on a real chroot store with every kind of
//! root: a direct link in gcroots, indirect `result` links (gcroots/auto), a profile, a
//! runtime root (a process whose environment names a store path), and keep-derivations.

use crate::common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use common::{Drydock, nix_build, nix_print_dead, nix_store};

/// Kills the runtime-root process however the test ends.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dead_set_matches_nix_and_gc_all_deletes_only_it() {
    let dir = common::scratch("gc-all");
    let root = dir.join("root");
    let state = dir.join("state");
    let expr = |names: &str| {
        format!(
            r#"let {p}
  lib = mk "lib" [] "echo lib > $out";
  app = mk "app" [ lib ] "mkdir $out; echo ${{lib}} > $out/ref";
  viaresult = mk "via-result" [ lib ] "echo ${{lib}} > $out";
  prof = mk "profile-thing" [] "echo p > $out";
  rt = mk "runtime-thing" [] "echo r > $out";
  driver = mk "nixos-test-driver-dead" [ lib ] "echo ${{lib}} > $out";
  dead = mk "vm-test-run-dead" [ driver ] "echo ${{driver}} > $out";
in [ {names} ]"#,
            p = common::PRELUDE
        )
    };
    let result = dir.join("result");
    let rooted = nix_build(&root, "rooted", &expr("viaresult"), Some(&result));
    let others = nix_build(&root, "others", &expr("app prof rt dead"), None);
    assert_eq!(rooted.len(), 1);
    let (app, prof, rt, dead) = (&others[0], &others[1], &others[2], &others[3]);
    // Direct root.
    std::os::unix::fs::symlink(app, root.join("nix/var/nix/gcroots/app-root")).unwrap();
    // Profile.
    std::os::unix::fs::symlink(prof, root.join("nix/var/nix/profiles/test-1-link")).unwrap();
    // Runtime root: a process whose environment names the path.
    let mut sleeper = Sleeper(
        Command::new("sleep")
            .arg("600")
            .env("DRYDOCK_TEST_RT", format!("{rt}/bin"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let nix_dead = nix_print_dead(&root);
    let plan = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--all", "--dry-run"])
        .run()
        .ok()
        .stdout_json();
    let ours: BTreeSet<String> = plan["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let theirs: BTreeSet<String> = nix_dead.iter().cloned().collect();
    assert_eq!(ours, theirs, "dead sets differ");
    assert!(ours.contains(dead), "the unrooted test run is dead");
    assert!(!ours.contains(rt), "the runtime root is alive");
    assert!(!ours.contains(prof) && !ours.contains(app) && !ours.contains(&rooted[0]));
    assert!(
        ours.iter().any(|p| p.ends_with("-vm-test-run-dead.drv")),
        "drvs of dead outputs are dead"
    );
    assert!(
        !ours.iter().any(|p| p.ends_with("-lib.drv")),
        "keep-derivations: the drv of a live output is alive"
    );
    assert!(plan["bytes"].as_u64().unwrap() > 0);

    let live_before = nix_store(&root, &["--gc", "--print-live"]);
    let done = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--all"])
        .run()
        .ok()
        .stdout_json();
    assert_eq!(
        done["deleted"].as_array().unwrap().len(),
        ours.len(),
        "{done}"
    );
    let store = root.join("nix/store");
    for p in &live_before {
        let base = p.strip_prefix("/nix/store/").unwrap();
        assert!(store.join(base).exists(), "live path {p} was deleted");
    }
    for p in &ours {
        let base = p.strip_prefix("/nix/store/").unwrap();
        assert!(!store.join(base).exists(), "dead path {p} is still there");
    }
    assert!(nix_print_dead(&root).is_empty());
    nix_store(&root, &["--verify", "--check-contents"]);
    sleeper.0.kill().unwrap();
    sleeper.0.wait().unwrap();
    // With the process gone, its path is dead too: same answer as Nix again.
    let plan = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--all", "--dry-run"])
        .run()
        .ok()
        .stdout_json();
    let ours: Vec<String> = serde_json::from_value(plan["paths"].clone()).unwrap();
    let mut ours = ours;
    ours.sort();
    assert_eq!(ours, nix_print_dead(&root));
    assert!(ours.contains(rt));
}
