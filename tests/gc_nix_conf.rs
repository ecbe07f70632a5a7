//! `drydock gc` reads Nix's configuration as Nix does: `keep-outputs = true` set through
//! `NIX_CONFIG`, through a file `include`d by `$NIX_CONF_DIR/nix.conf` or through the user's
//! file makes a live `.drv` keep its outputs alive, in drydock's dead set exactly as in
//! `nix-store --gc --print-dead` under the same environment; `NIX_CONFIG` wins over the files;
//! `gc --all` under that environment deletes only what Nix calls dead; and an unreadable
//! configuration file is bad input (exit 2) naming the file.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Drydock, Ran, is_store_path, nix_build, nix_store};

/// The Nix configuration environment of one scenario. Every variable Nix reads its
/// configuration from is set, so the machine's `/etc/nix/nix.conf` and `~/.config` play no part.
#[derive(Clone)]
struct ConfEnv {
    conf_dir: PathBuf,
    user_files: PathBuf,
    nix_config: Option<&'static str>,
}

impl ConfEnv {
    fn apply(&self, cmd: &mut Command) {
        cmd.env("NIX_CONF_DIR", &self.conf_dir)
            .env("NIX_USER_CONF_FILES", &self.user_files)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CONFIG_DIRS");
        match self.nix_config {
            Some(v) => cmd.env("NIX_CONFIG", v),
            None => cmd.env_remove("NIX_CONFIG"),
        };
    }
}

/// `nix-store --store ROOT --gc --print-dead` under `env`: the dead store paths, sorted.
fn nix_dead(root: &Path, env: &ConfEnv) -> BTreeSet<String> {
    let mut cmd = Command::new("nix-store");
    cmd.arg("--store").arg(root).args(["--gc", "--print-dead"]);
    env.apply(&mut cmd);
    let out = cmd.output().expect("run nix-store");
    assert!(
        out.status.success(),
        "nix-store --print-dead: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| is_store_path(l))
        .map(str::to_owned)
        .collect()
}

/// `drydock --store ROOT --state-dir STATE --json ARGS` under `env`.
fn drydock(root: &Path, state: &Path, env: &ConfEnv, args: &[&str]) -> Ran {
    let env = env.clone();
    Drydock::on(root, state)
        .json()
        .args(args)
        .with(move |cmd| env.apply(cmd))
        .run()
}

/// The paths of `drydock gc --all --dry-run --json` under `env`.
fn drydock_dead(root: &Path, state: &Path, env: &ConfEnv) -> BTreeSet<String> {
    let out = drydock(root, state, env, &["gc", "--all", "--dry-run"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(plan["paths"].clone()).unwrap()
}

#[test]
fn keep_outputs_from_any_config_source_changes_the_dead_set_as_in_nix() {
    let dir = common::scratch("gc-nix-conf");
    let root = dir.join("root");
    let state = dir.join("state");
    let expr = format!(
        r#"let {p}
  lib = mk "lib" [] "echo lib > $out";
  app = mk "app" [ lib ] "mkdir $out; echo ${{lib}} > $out/ref";
  other = mk "other" [] "echo other > $out";
in [ app other ]"#,
        p = common::PRELUDE
    );
    let built = nix_build(&root, "conf", &expr, None);
    let (app, other) = (&built[0], &built[1]);
    let lib = std::fs::read_to_string(root.join(app.trim_start_matches('/')).join("ref"))
        .unwrap()
        .trim()
        .to_owned();
    let app_drv = nix_store(&root, &["-q", "--deriver", app]).remove(0);
    // Only the derivation is rooted: its outputs live only if keep-outputs says so.
    std::os::unix::fs::symlink(&app_drv, root.join("nix/var/nix/gcroots/app-drv")).unwrap();

    // The configurations.
    let empty = dir.join("conf-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let including = dir.join("conf-include");
    std::fs::create_dir_all(&including).unwrap();
    std::fs::write(including.join("nix.conf"), "include gc.conf\n").unwrap();
    std::fs::write(including.join("gc.conf"), "keep-outputs = true\n").unwrap();
    let user_file = dir.join("user-nix.conf");
    std::fs::write(&user_file, "keep-outputs = true\n").unwrap();
    let no_user_file = dir.join("no-such-user-nix.conf");
    let env = |conf_dir: &Path, user_files: &Path, nix_config| ConfEnv {
        conf_dir: conf_dir.to_owned(),
        user_files: user_files.to_owned(),
        nix_config,
    };
    // (scenario, environment, whether keep-outputs is on)
    let scenarios = [
        ("defaults", env(&empty, &no_user_file, None), false),
        (
            "NIX_CONFIG",
            env(&empty, &no_user_file, Some("keep-outputs = true")),
            true,
        ),
        ("included file", env(&including, &no_user_file, None), true),
        ("user's file", env(&empty, &user_file, None), true),
        (
            "NIX_CONFIG wins over the included file",
            env(&including, &no_user_file, Some("keep-outputs = false")),
            false,
        ),
    ];
    for (what, e, keep_outputs) in &scenarios {
        let theirs = nix_dead(&root, e);
        let ours = drydock_dead(&root, &state, e);
        assert_eq!(ours, theirs, "{what}: dead sets differ");
        // The environment really mattered: the outputs of the rooted .drv (and of its input
        // derivation) are dead exactly when keep-outputs is off.
        for out in [app, &lib] {
            assert_eq!(ours.contains(out), !keep_outputs, "{what}: {out}");
        }
        assert!(ours.contains(other), "{what}: an unrooted path is dead");
        assert!(!ours.contains(&app_drv), "{what}: the rooted .drv is alive");
    }

    // Collect for real with keep-outputs on: only what Nix calls dead goes.
    let (_, e, _) = &scenarios[1];
    let dead = nix_dead(&root, e);
    let out = drydock(&root, &state, e, &["gc", "--all"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let deleted: BTreeSet<String> = serde_json::from_value(done["deleted"].clone()).unwrap();
    assert_eq!(deleted, dead, "{done}");
    let store = root.join("nix/store");
    let physical = |p: &str| store.join(p.strip_prefix("/nix/store/").unwrap());
    for p in [app, &lib, &app_drv] {
        assert!(physical(p).exists(), "live path {p} was deleted");
    }
    assert!(
        !physical(other).exists(),
        "dead path {other} is still there"
    );
    assert!(nix_dead(&root, e).is_empty());
    nix_store(&root, &["--verify", "--check-contents"]);
}

#[test]
fn unreadable_nix_conf_is_bad_input_naming_it() {
    let dir = common::scratch("gc-nix-conf-unreadable");
    let root = dir.join("root");
    let state = dir.join("state");
    nix_build(
        &root,
        "one",
        &format!("let {} in mk \"one\" [] \"echo 1 > $out\"", common::PRELUDE),
        None,
    );
    // Through an include, so that the error must name the included file: a directory where
    // the file should be exists and cannot be read.
    let conf_dir = dir.join("conf");
    std::fs::create_dir_all(conf_dir.join("gc.conf")).unwrap();
    std::fs::write(conf_dir.join("nix.conf"), "include gc.conf\n").unwrap();
    let e = ConfEnv {
        conf_dir: conf_dir.clone(),
        user_files: dir.join("none.conf"),
        nix_config: None,
    };
    for args in [
        &["gc", "--all", "--dry-run"][..],
        &["gc", "--all"],
        &["runs"],
        &["store", "check"],
    ] {
        let out = drydock(&root, &state, &e, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&conf_dir.join("gc.conf").display().to_string()),
            "{args:?}: {err}"
        );
    }
    // Nothing was deleted.
    assert_eq!(common::valid_paths(&root).len(), 2);
}
