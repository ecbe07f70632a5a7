//! The `rm -rf` damage: deleting a test driver's `.drv` and output by hand leaves them
//! registered and breaks the next build. `store check` names the missing `.drv`,
//! `store repair` refuses while a root holds the damage, then heals it through Nix, and the
//! build works again.

use crate::common;

use std::process::Command;

use common::{Drydock, nix_store};

fn build(
    root: &std::path::Path,
    file: &std::path::Path,
    link: &std::path::Path,
) -> std::process::Output {
    Command::new("nix-build")
        .arg("--store")
        .arg(root)
        .arg(file)
        .args(common::NIX_BUILD_OPTIONS)
        .arg("-o")
        .arg(link)
        .output()
        .unwrap()
}

#[test]
fn rm_rf_damage_is_found_and_repaired_through_nix() {
    let dir = common::scratch("store-repair");
    let root = dir.join("root");
    let state = dir.join("state");
    let expr = format!(
        r#"let {p}
  driver = mk "nixos-test-driver-login" [] "echo driver > $out";
  run = mk "vm-test-run-login" [ driver ] "echo ${{driver}} > $out";
in run"#,
        p = common::PRELUDE
    );
    let result = dir.join("result");
    common::nix_build(&root, "t", &expr, Some(&result));
    let file = dir.join("t.nix");

    let v = Drydock::on(&root, &state)
        .json()
        .args(["store", "check"])
        .run()
        .ok()
        .stdout_json();
    assert_eq!(v["damaged"], false);

    // The hand-made damage.
    let store = root.join("nix/store");
    let mut removed = Vec::new();
    for e in std::fs::read_dir(&store).unwrap() {
        let e = e.unwrap();
        let n = e.file_name().into_string().unwrap();
        if n.contains("nixos-test-driver") {
            std::fs::remove_dir_all(e.path())
                .or_else(|_| std::fs::remove_file(e.path()))
                .unwrap();
            removed.push(format!("/nix/store/{n}"));
        }
    }
    assert_eq!(removed.len(), 2);
    // Rebuild after a change breaks as users see it.
    std::fs::write(
        &file,
        expr.replace("echo ${driver} >", "echo again ${driver} >"),
    )
    .unwrap();
    let broken = build(&root, &file, &result);
    assert!(!broken.status.success());
    let msg = String::from_utf8_lossy(&broken.stderr);
    assert!(msg.contains("nixos-test-driver-login.drv"), "{msg}");

    let v = Drydock::on(&root, &state)
        .json()
        .args(["store", "check"])
        .run()
        .exit(1)
        .stdout_json();
    let missing: Vec<String> = serde_json::from_value(v["missing"].clone()).unwrap();
    let mut want = removed.clone();
    want.sort();
    let mut got = missing.clone();
    got.sort();
    assert_eq!(got, want);
    assert!(
        missing
            .iter()
            .any(|m| m.ends_with("nixos-test-driver-login.drv"))
    );

    // The result link holds the test run, which refers to the missing driver: refused.
    let text = Drydock::on(&root, &state)
        .args(["store", "repair"])
        .run()
        .exit(1)
        .stdout_str();
    assert!(text.contains(&result.display().to_string()), "{text}");
    assert_eq!(
        Drydock::on(&root, &state)
            .json()
            .args(["store", "check"])
            .run()
            .exit(1)
            .stdout_json()["damaged"],
        true
    );

    // A dry run changes nothing; asked to, repair removes the result link that holds the
    // damage (and only that), then heals.
    let v = Drydock::on(&root, &state)
        .json()
        .args(["store", "repair", "--dry-run"])
        .run()
        .exit(1)
        .stdout_json();
    assert!(v["removed"].as_array().unwrap().is_empty());
    assert!(!v["blocked"].as_array().unwrap().is_empty());
    assert!(std::fs::symlink_metadata(&result).is_ok());
    let v = Drydock::on(&root, &state)
        .json()
        .args(["store", "repair", "--remove-roots"])
        .run()
        .ok()
        .stdout_json();
    let roots_removed: Vec<String> = serde_json::from_value(v["roots_removed"].clone()).unwrap();
    assert_eq!(roots_removed, vec![result.display().to_string()]);
    assert!(std::fs::symlink_metadata(&result).is_err());
    let removed_db: Vec<String> = serde_json::from_value(v["removed"].clone()).unwrap();
    assert!(
        removed_db.iter().any(|p| p.contains("vm-test-run-login")),
        "{v}"
    );
    assert_eq!(
        Drydock::on(&root, &state)
            .json()
            .args(["store", "check"])
            .run()
            .ok()
            .stdout_json()["damaged"],
        false
    );
    nix_store(&root, &["--verify"]);

    let fixed = build(&root, &file, &result);
    assert!(
        fixed.status.success(),
        "{}",
        String::from_utf8_lossy(&fixed.stderr)
    );
}
