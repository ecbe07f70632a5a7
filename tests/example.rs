//! The example composition (`examples/cluster`) as a new user meets it: copied to a directory
//! outside the repository, with no `NIX_CONFIG` and a store drydock creates, `up --detach` run
//! in that directory builds the test system (nothing from the host in Nix's sandbox, no binary
//! cache asked) and boots the four machines; the agents register with the server by name,
//! `exec` answers, `down` leaves nothing behind. Without `DRYDOCK_GUEST_DIR` the copy says what
//! to set. Needs root (the store server's sandbox) and the test guest's kernel.

use std::path::Path;
use std::process::Command;

use crate::vmcommon::{DownOnDrop, cluster_down, cluster_drydock, guest_ready, text};

/// The example, copied to `DIR/cluster/drydock.nix` of a new directory in the system's
/// temporary directory; returns the directory and the copy's folder.
fn copy_of_example() -> (tempfile::TempDir, std::path::PathBuf) {
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
    (dir, folder)
}

/// drydock as the user runs it in the copy's folder: no `NIX_CONFIG`, and the guest's builder
/// named only when `guest` says so.
fn drydock(store: &Path, state: &Path, folder: &Path, guest: bool) -> Command {
    let mut c = cluster_drydock(store, state);
    c.current_dir(folder).env_remove("DRYDOCK_GUEST_DIR");
    if guest {
        c.env(
            "DRYDOCK_GUEST_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest"),
        );
    }
    c
}

#[test]
fn a_copy_of_the_example_comes_up_without_nix_config() {
    guest_ready();
    let (dir, folder) = copy_of_example();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let state = dir.path().join("state");

    // Away from the repository, the copy cannot find the guest's builder: it says what to set.
    let o = drydock(&store, &state, &folder, false)
        .args(["up", "--dry-run"])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("set DRYDOCK_GUEST_DIR to the scripts/guest directory"),
        "{err}"
    );

    let file = folder.join("drydock.nix");
    let _down = DownOnDrop {
        store: store.clone(),
        state: state.clone(),
        file: file.clone(),
    };
    let up = drydock(&store, &state, &folder, true)
        .args(["up", "--detach", "--accel", "tcg", "--timeout", "300"])
        .output()
        .unwrap();
    let err = text(&up.stderr);
    assert!(up.status.success(), "up: {err}");
    assert!(err.contains("(4 machines"), "{err}");
    assert!(
        !err.contains("cache.nixos.org"),
        "a binary cache was asked: {err}"
    );

    // The agents register by name on their own, after boot (any order).
    let w = drydock(&store, &state, &folder, true)
        .args([
            "wait",
            "server",
            "--succeeds",
            r#"[ "$(wc -l < /registry)" -ge 4 ]"#,
            "--timeout",
            "120",
        ])
        .output()
        .unwrap();
    assert!(w.status.success(), "wait: {}", text(&w.stderr));
    let cat = drydock(&store, &state, &folder, true)
        .args(["exec", "server", "--", "cat /registry"])
        .output()
        .unwrap();
    assert!(cat.status.success(), "exec: {}", text(&cat.stderr));
    let mut names: Vec<String> = text(&cat.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    names.sort();
    assert_eq!(names, ["agent1", "agent2", "agent3", "server"]);

    cluster_down(&store, &state, &file);
}
