//! The example composition (`examples/cluster`) as a new user meets it: an ordinary user made by
//! the test, the example copied to a directory outside the repository, no `NIX_CONFIG`, the
//! guest cache in the user's own `~/.cache`, a store drydock creates. Without
//! `DRYDOCK_GUEST_DIR` the copy says what to set; with it, `up --detach` run in that directory
//! builds the test system (nothing from the host in Nix's sandbox, no binary cache asked) and
//! boots the four machines, saying once (not once per machine) that they run without a cgroup of
//! their own when the doctor says the user cannot make one; the agents register with the server
//! by name, `exec` answers, `down` leaves nothing behind. Needs root (to make the user) and the
//! test guest's kernel.

use std::path::{Path, PathBuf};

use crate::common::{Drydock, TempUser, is_root};
use crate::vmcommon::{guest_cache, guest_ready, text, wait_no_processes};

/// Where the user's things are, all in one new directory of the system's temporary directory.
struct Place {
    /// Removed on drop, with everything in it.
    _dir: tempfile::TempDir,
    home: PathBuf,
    folder: PathBuf,
    store: PathBuf,
    state: PathBuf,
}

/// The example copied to `DIR/cluster/drydock.nix`, the guest's kernel and initrd in
/// `DIR/home/.cache/drydock/guest` (where scripts/setup, run by that user, would put them), an
/// empty store; all of it given to `user`.
fn place_for(user: &TempUser) -> Place {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::Builder::new()
        .prefix("drydock-example-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    assert!(
        !dir.path().starts_with(repo),
        "the copy must be outside the repository: {}",
        dir.path().display()
    );
    let folder = dir.path().join("cluster");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(
        repo.join("examples/cluster/drydock.nix"),
        folder.join("drydock.nix"),
    )
    .unwrap();
    let home = dir.path().join("home");
    let cache = home.join(".cache/drydock/guest");
    std::fs::create_dir_all(cache.join("kernel")).unwrap();
    let from = Path::new(&guest_cache()).join("guest");
    for f in ["kernel/version", "kernel/vmlinux", "initrd"] {
        std::fs::copy(from.join(f), cache.join(f)).unwrap();
    }
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let state = dir.path().join("state");
    user.own(dir.path());
    Place {
        _dir: dir,
        home,
        folder,
        store,
        state,
    }
}

/// drydock as `user` runs it in the copy's folder: no `NIX_CONFIG`, the guest cache found
/// through `HOME`, and the guest's builder named only when `guest` says so.
fn drydock(user: &TempUser, p: &Place, guest: bool) -> Drydock {
    let folder = p.folder.clone();
    let c = user
        .drydock()
        .store(&p.store)
        .state(&p.state)
        .with(move |c| {
            c.current_dir(folder);
        })
        .env("HOME", &p.home)
        .env_remove("NIX_CONFIG")
        .env_remove("DRYDOCK_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DRYDOCK_GUEST_DIR");
    if guest {
        c.env(
            "DRYDOCK_GUEST_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest"),
        )
    } else {
        c
    }
}

/// Takes the example's cluster down (as root) if the test ends before its own `down`.
struct DownOnDrop {
    store: PathBuf,
    state: PathBuf,
    file: PathBuf,
}

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = Drydock::on(&self.store, &self.state)
            .arg("down")
            .arg("-f")
            .arg(&self.file)
            .run();
    }
}

#[test]
fn a_copy_of_the_example_comes_up_for_an_ordinary_user_without_nix_config() {
    if !is_root() {
        eprintln!("skipped: needs root (useradd)");
        return;
    }
    guest_ready();
    let user = TempUser::create();
    let p = place_for(&user);

    // Away from the repository, the copy cannot find the guest's builder: it says what to set.
    let o = drydock(&user, &p, false).args(["up", "--dry-run"]).run();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("set DRYDOCK_GUEST_DIR to the scripts/guest directory"),
        "{err}"
    );

    // Whether this user can give a VM a cgroup of its own, as the doctor finds it.
    let doctor = drydock(&user, &p, true).args(["--json", "doctor"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&doctor.stdout)
        .unwrap_or_else(|e| panic!("doctor: {e}: {}", text(&doctor.stderr)));
    let placement = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "cgroup.placement")
        .unwrap();
    let no_cgroup = placement["status"] != "pass";

    let file = p.folder.join("drydock.nix");
    let _down = DownOnDrop {
        store: p.store.clone(),
        state: p.state.clone(),
        file: file.clone(),
    };
    let up = drydock(&user, &p, true)
        .args(["up", "--detach", "--accel", "tcg", "--timeout", "300"])
        .run();
    let err = text(&up.stderr);
    assert!(up.status.success(), "up: {err}");
    assert!(err.contains("(4 machines"), "{err}");
    // Nix's words when it asks a binary cache it cannot reach.
    assert!(
        !err.contains("unable to download"),
        "a binary cache was asked: {err}"
    );
    // Four machines, one owner: at most one line about cgroups, in the cluster's log.
    let log = std::fs::read_to_string(p.state.join("clusters/cluster/drydock.log")).unwrap();
    let said = log
        .lines()
        .filter(|l| l.contains("without a cgroup of their own"))
        .count();
    assert_eq!(said, usize::from(no_cgroup), "{placement}\n{log}");
    assert!(!log.contains("runs without its own cgroup"), "{log}");

    // The agents register by name on their own, after boot (any order).
    let w = drydock(&user, &p, true)
        .args([
            "wait",
            "server",
            "--succeeds",
            r#"[ "$(wc -l < /registry)" -ge 4 ]"#,
            "--timeout",
            "120",
        ])
        .run();
    assert!(w.status.success(), "wait: {}", text(&w.stderr));
    let cat = drydock(&user, &p, true)
        .args(["exec", "server", "--", "cat /registry"])
        .run();
    assert!(cat.status.success(), "exec: {}", text(&cat.stderr));
    let mut names: Vec<String> = text(&cat.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    names.sort();
    assert_eq!(names, ["agent1", "agent2", "agent3", "server"]);

    let down = drydock(&user, &p, true).arg("down").run();
    assert!(down.status.success(), "down: {}", text(&down.stderr));
    wait_no_processes(&p.state, std::time::Duration::from_secs(30));
}
