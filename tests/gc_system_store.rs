//! The system store, without `--store`: drydock takes the store and Nix's state from
//! `NIX_STORE_DIR` / `NIX_STATE_DIR`, as Nix does. A store with a non-default store directory
//! is built by plain `nix-build` under those variables (no `--store`, nothing under `/nix`),
//! with a direct root in `$NIX_STATE_DIR/gcroots`, an indirect `result` root
//! (`$NIX_STATE_DIR/gcroots/auto`) and a dead test run. Then, under the same environment:
//! `du` measures that store; `gc --all --dry-run` finds exactly `nix-store --gc --print-dead`;
//! `gc --all` deletes exactly that through Nix, and the store verifies clean.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Drydock, Ran};

/// A private system store: every directory Nix would take from `/nix` or `/etc/nix`.
#[derive(Clone)]
struct SystemStore {
    dir: PathBuf,
    store: PathBuf,
    state: PathBuf,
}

impl SystemStore {
    fn new(dir: &Path) -> Self {
        let s = Self {
            dir: dir.to_owned(),
            store: dir.join("store"),
            state: dir.join("var/nix"),
        };
        // Nix's defaults (sandboxed builds), but no build users: Nix takes their locks from
        // `$NIX_STATE_DIR/userpool`, so with a private state dir it would not see the machine's
        // locks, and killing the build user's processes before a build could hit a concurrent
        // build of another store. As root without build users, builds run sandboxed as root.
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/nix.conf"), "build-users-group =\n").unwrap();
        s
    }

    /// Set the environment of `cmd` so that it sees this store as the system store.
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("NIX_STORE_DIR", &self.store)
            .env("NIX_STATE_DIR", &self.state)
            .env("NIX_LOG_DIR", self.dir.join("var/log/nix"))
            .env("NIX_CONF_DIR", self.dir.join("etc"))
            .env("NIX_USER_CONF_FILES", self.dir.join("no-user-nix.conf"))
            .env_remove("NIX_CONFIG")
            .env_remove("NIX_REMOTE")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CONFIG_DIRS")
    }

    fn run(&self, cmd: &mut Command) -> Vec<String> {
        let out = self.apply(cmd).output().expect("run");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `nix-build FILE -A ATTR` (no `--store`), with an out link or none.
    fn build(&self, file: &Path, attr: &str, out_link: Option<&Path>) -> String {
        let mut cmd = Command::new("nix-build");
        cmd.arg(file)
            .args(["-A", attr])
            .args(common::NIX_BUILD_OPTIONS);
        match out_link {
            Some(l) => cmd.arg("-o").arg(l),
            None => cmd.arg("--no-out-link"),
        };
        let mut out = self.run(&mut cmd);
        assert_eq!(out.len(), 1, "{out:?}");
        out.remove(0)
    }

    fn nix_store(&self, args: &[&str]) -> Vec<String> {
        self.run(Command::new("nix-store").args(args))
    }

    /// `nix-store --gc --print-dead`: the dead store paths (Nix also prints junk such as
    /// lock files; only store paths are compared).
    fn nix_dead(&self) -> BTreeSet<String> {
        let prefix = format!("{}/", self.store.display());
        self.nix_store(&["--gc", "--print-dead"])
            .into_iter()
            .filter(|l| l.strip_prefix(&prefix).is_some_and(|b| b.len() > 33))
            .filter(|l| !l.ends_with(".lock"))
            .collect()
    }

    /// `drydock --state-dir STATE --json ARGS`, without `--store`.
    fn drydock(&self, args: &[&str]) -> Ran {
        let env = self.clone();
        Drydock::new()
            .state(&self.dir.join("drydock-state"))
            .json()
            .args(args)
            .with(move |cmd| {
                env.apply(cmd);
            })
            .run()
    }

    fn drydock_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.drydock(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "drydock {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn physical(&self, p: &str) -> PathBuf {
        let base = p
            .strip_prefix(&format!("{}/", self.store.display()))
            .unwrap_or_else(|| panic!("{p} is not in {}", self.store.display()));
        self.store.join(base)
    }
}

/// `du -s -c -B1` of `paths` (hard links once).
fn gnu_du(paths: &[PathBuf]) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-c", "-B1"])
        .args(paths)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let total = text.lines().last().unwrap();
    total.split_whitespace().next().unwrap().parse().unwrap()
}

/// Every symlink below `dir` (not following links), with its target.
fn links_below(dir: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_symlink() => {
                if let Ok(target) = std::fs::read_link(&p) {
                    out.push((p, target));
                }
            }
            Ok(t) if t.is_dir() => links_below(&p, out),
            _ => {}
        }
    }
}

#[test]
fn du_and_gc_all_on_the_system_store_named_by_nix_store_dir() {
    let dir = common::scratch("gc-system-store");
    let s = SystemStore::new(&dir);
    let file = dir.join("fixture.nix");
    std::fs::write(
        &file,
        format!(
            r#"let {p}
  lib = mk "lib" [] "echo lib > $out";
  kept = mk "vm-test-run-kept" [ lib ] "mkdir $out; echo ${{lib}} > $out/ref";
  live = mk "nixos-test-driver-live" [] "echo live > $out";
  dead = mk "vm-test-run-dead" [ lib ] "echo ${{lib}} > $out";
in {{ inherit kept live dead; }}"#,
            p = common::PRELUDE
        ),
    )
    .unwrap();
    let result = dir.join("result");
    let kept = s.build(&file, "kept", None);
    let live = s.build(&file, "live", Some(&result));
    let dead = s.build(&file, "dead", None);
    for p in [&kept, &live, &dead] {
        assert!(s.physical(p).exists(), "{p} was built into NIX_STORE_DIR");
    }
    let lib = std::fs::read_to_string(s.physical(&kept).join("ref"))
        .unwrap()
        .trim()
        .to_owned();
    let dead_drv = s.nix_store(&["-q", "--deriver", &dead]).remove(0);
    // A direct root where Nix looks for this state directory's roots.
    std::os::unix::fs::symlink(&kept, s.state.join("gcroots/kept")).unwrap();
    // nix-build registered the result link as an indirect root there too.
    let mut auto = Vec::new();
    links_below(&s.state.join("gcroots/auto"), &mut auto);
    assert!(auto.iter().any(|(_, t)| t == &result), "{auto:?}");

    // du: the test artifacts of this store.
    let rep = s.drydock_json(&["du"]);
    let entries: Vec<PathBuf> = std::fs::read_dir(&s.store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let with = |pred: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = entries
            .iter()
            .filter(|p| pred(&p.file_name().unwrap().to_string_lossy()))
            .cloned()
            .collect();
        v.sort();
        v
    };
    let runs = with(&|n| n.contains("-vm-test-run-") && !n.ends_with(".drv"));
    assert_eq!(runs.len(), 2);
    assert_eq!(
        rep["by_class"]["test_run"].as_u64().unwrap(),
        gnu_du(&runs),
        "{rep}"
    );
    let drivers = with(&|n| n.contains("-nixos-test-driver-") && !n.ends_with(".drv"));
    assert_eq!(
        rep["by_class"]["test_driver"].as_u64().unwrap(),
        gnu_du(&drivers),
        "{rep}"
    );
    let drvs = with(&|n| n.ends_with(".drv"));
    assert_eq!(drvs.len(), 4);
    assert_eq!(
        rep["by_class"]["derivation"].as_u64().unwrap(),
        gnu_du(&drvs),
        "{rep}"
    );

    // gc --all --dry-run: Nix's dead set.
    let theirs = s.nix_dead();
    let plan = s.drydock_json(&["gc", "--all", "--dry-run"]);
    let ours: BTreeSet<String> = serde_json::from_value(plan["paths"].clone()).unwrap();
    assert_eq!(ours, theirs, "dead sets differ");
    assert!(ours.contains(&dead) && ours.contains(&dead_drv), "{ours:?}");
    for p in [&kept, &live, &lib] {
        assert!(!ours.contains(p), "{p} is alive");
    }

    // gc --all: exactly that goes, through Nix.
    let done = s.drydock_json(&["gc", "--all"]);
    let deleted: BTreeSet<String> = serde_json::from_value(done["deleted"].clone()).unwrap();
    assert_eq!(deleted, ours, "{done}");
    assert!(!s.physical(&dead).exists() && !s.physical(&dead_drv).exists());
    for p in [&kept, &live, &lib] {
        assert!(s.physical(p).exists(), "live path {p} was deleted");
    }
    assert!(s.nix_dead().is_empty());
    s.nix_store(&["--verify", "--check-contents"]);

    // None of this reached the machine's /nix: no path of ours in /nix/store, no root or
    // build log of ours under /nix/var.
    for p in [&kept, &live, &dead, &lib, &dead_drv] {
        let base = Path::new(p).file_name().unwrap();
        assert!(
            !Path::new("/nix/store").join(base).exists(),
            "{p} in /nix/store"
        );
    }
    let mut roots = Vec::new();
    links_below(Path::new("/nix/var/nix/gcroots"), &mut roots);
    links_below(Path::new("/nix/var/nix/profiles"), &mut roots);
    for (link, target) in &roots {
        assert!(
            !target.starts_with(&dir),
            "{} -> {}",
            link.display(),
            target.display()
        );
    }
    let drv_base = Path::new(&dead_drv).file_name().unwrap().to_string_lossy();
    let log = Path::new("/nix/var/log/nix/drvs")
        .join(&drv_base[..2])
        .join(format!("{}.bz2", &drv_base[2..]));
    assert!(!log.exists(), "{}", log.display());
}
