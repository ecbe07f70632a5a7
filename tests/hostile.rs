//! What a hostile pass found, each class with a regression test on real files, processes and
//! signals: closed pipes, files that are not regular (FIFOs, links to `/dev/zero`), warnings that
//! would leak file contents, gc keeping what it cannot read about, freed bytes measured from the
//! deleted inodes (also with two collections at once), bad input that must exit 2 with the true
//! cause, Ctrl-C of `track` after its command exited, and a command that cannot start.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use common::{Drydock, PRELUDE, nix_build_cmd, scratch, track_ok};

/// A small chroot store with one tracked run of `n` paths of `kib` KiB each (distinct contents,
/// so nothing is shared); returns (root, state, run id).
fn store_with_run(name: &str, n: usize, kib: usize) -> (PathBuf, PathBuf, i64) {
    let dir = scratch(name);
    let root = dir.join("store");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let file = dir.join("paths.nix");
    std::fs::write(
        &file,
        format!(
            "let {PRELUDE} in builtins.genList (i: mk \"p${{toString i}}-{name}\" [] \
             \"mkdir $out; dd if=/dev/zero of=$out/data bs=1024 count={kib} 2>/dev/null; echo {name}-${{toString i}} > $out/id\") {n}"
        ),
    )
    .unwrap();
    track_ok(&root, &state, &nix_build_cmd(&root, &file, "--no-out-link"));
    let doc = Drydock::on(&root, &state)
        .json()
        .args(["runs"])
        .run()
        .ok()
        .stdout_json();
    let id = doc["runs"][0]["id"].as_i64().unwrap();
    (root, state, id)
}

/// Run drydock with stdout on a pipe whose reading end is already closed.
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Drydock::new()
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .run();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_ends_quietly_with_exit_0() {
    let (root, state, id) = store_with_run("pipe", 3, 1);
    let (r, s) = (root.to_str().unwrap(), state.to_str().unwrap());
    let id = id.to_string();
    let empty = scratch("pipe-empty-state");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--state-dir", empty.to_str().unwrap(), "vm", "list"],
        vec!["--state-dir", s, "--json", "vm", "list"],
        vec!["--store", r, "--state-dir", s, "runs"],
        vec!["--store", r, "--state-dir", s, "--json", "runs"],
        vec!["--store", r, "--state-dir", s, "runs", "show", &id],
        vec!["--store", r, "--state-dir", s, "du"],
        vec!["--store", r, "--state-dir", s, "--json", "doctor"],
        vec!["--store", r, "--state-dir", s, "gc", "--all", "--dry-run"],
        vec!["--store", r, "--state-dir", s, "store", "check"],
    ];
    for args in cases {
        let (code, err) = with_closed_stdout(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("Broken pipe") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn files_that_are_not_regular_are_refused_without_blocking_or_reading_for_ever() {
    let (root, state, _) = store_with_run("nonregular", 1, 1);
    let dir = root.parent().unwrap().to_owned();
    // A `.drv` in the store that links to /dev/zero made `track` read until memory ran out;
    // one that is a FIFO made it block in open() for ever. The tracked command names them on
    // its stdout, as a build names what it built.
    let store = root.join("nix/store");
    for (base, make) in [
        (
            "00000000000000000000000000000000-zero.drv",
            "ln -s /dev/zero",
        ),
        ("11111111111111111111111111111111-fifo.drv", "mkfifo"),
    ] {
        let cmd = format!(
            "{make} {}/{base} && echo /nix/store/{base}",
            store.display()
        );
        let t = Instant::now();
        let mut child = Drydock::on(&root, &state)
            .args(["track", "--", "sh", "-c", &cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("track did not finish: it is reading or waiting on {base}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(
            err.contains(base) && (err.contains("symbolic link") || err.contains("FIFO")),
            "{err}"
        );
        std::fs::remove_file(store.join(base)).unwrap();
    }

    // Nix's configuration as a FIFO: every command reads it; none may block in open().
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let st = Command::new("mkfifo")
        .arg(conf.join("nix.conf"))
        .status()
        .unwrap();
    assert!(st.success());
    // `gc` with this configuration dir (bounded by a deadline, in case open() blocks): its exit
    // code and stderr.
    let gc_with_conf = || {
        let out = Drydock::on(&root, &state)
            .args(["gc", "--all", "--dry-run"])
            .env("NIX_CONF_DIR", &conf)
            .env("NIX_USER_CONF_FILES", dir.join("none"))
            .timeout(Duration::from_secs(60))
            .run();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = gc_with_conf();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("nix.conf") && err.contains("FIFO"), "{err}");
    // ... nor a link to /dev/zero.
    std::fs::remove_file(conf.join("nix.conf")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", conf.join("nix.conf")).unwrap();
    let (code, err) = gc_with_conf();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("character device"), "{err}");
}

#[test]
fn configuration_warnings_name_the_file_and_line_never_its_contents() {
    let (root, state, _) = store_with_run("leak", 1, 1);
    let dir = root.parent().unwrap();
    let secret = dir.join("secret");
    std::fs::write(
        &secret,
        "root:$y$SECRETHASH:19000:0:99999:7:::\nplain words here\n",
    )
    .unwrap();
    let out = Drydock::on(&root, &state)
        .args(["gc", "--all", "--dry-run"])
        .env("NIX_CONFIG", format!("include {}", secret.display()))
        .env("NIX_USER_CONF_FILES", dir.join("none"))
        .run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("SECRETHASH") && !err.contains("plain words"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}, line 1", secret.display()))
            && err.contains(&format!("{}, line 2", secret.display())),
        "{err}"
    );
}

#[test]
fn gc_keeps_store_images_while_a_launch_record_is_unreadable() {
    let (root, state, _) = store_with_run("images", 1, 1);
    let images = state.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let image = images.join(format!("{}.erofs", "ab".repeat(16)));
    let vm = state.join("vms/broken");
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::write(vm.join("launch.json"), b"{\"spec\": {\"na").unwrap();
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let out = Drydock::on(&root, &state).args(["gc", "--all"]).run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        image.exists(),
        "gc removed an image it could not tell was unused: {err}"
    );
    assert!(
        err.contains(&vm.join("launch.json").display().to_string()),
        "{err}"
    );
    // With the record gone, nothing uses the image: the same gc removes it (the test can fail).
    std::fs::remove_dir_all(&vm).unwrap();
    let out = Drydock::on(&root, &state).args(["gc", "--all"]).run();
    assert_eq!(out.status.code(), Some(0));
    assert!(!image.exists());
}

/// Disk blocks of every inode under the paths, each once (what deleting them frees).
fn blocks_under(paths: &[PathBuf]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for p in paths {
        for e in walkdir(p) {
            let m = std::fs::symlink_metadata(&e).unwrap();
            if seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![p.to_owned()];
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            out.extend(walkdir(&e.path()));
        }
    }
    out
}

#[test]
fn freed_bytes_are_the_deleted_inodes_even_with_two_collections_at_once() {
    let (root, state, id) = store_with_run("freed", 40, 8);
    let doc = Drydock::on(&root, &state)
        .json()
        .args(["gc", "--run", &id.to_string(), "--dry-run"])
        .run()
        .ok()
        .stdout_json();
    let planned: Vec<PathBuf> = doc["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| root.join(p.as_str().unwrap().trim_start_matches('/')))
        .collect();
    assert!(planned.len() >= 40, "{doc}");
    let expected = blocks_under(&planned);
    // Two collections of the same run at once: together they free what the paths held, and
    // neither claims the other's deletions.
    let spawn = || {
        Drydock::on(&root, &state)
            .args(["--json", "gc", "--run", &id.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let (a, b) = (spawn(), spawn());
    let mut freed = 0;
    let mut deleted = 0;
    for c in [a, b] {
        let out = c.output();
        let err = String::from_utf8_lossy(&out.stderr);
        // The second may find the run collected already: bad input naming the run.
        if out.status.code() == Some(2) {
            assert!(err.contains(&format!("run {id}")), "{err}");
            continue;
        }
        assert_eq!(out.status.code(), Some(0), "{err}");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let f = doc["freed_bytes"].as_i64().unwrap();
        assert!(f >= 0, "{doc}");
        freed += f;
        deleted += doc["deleted"].as_array().unwrap().len();
    }
    assert!(planned.iter().all(|p| !p.exists()));
    assert!(
        deleted >= planned.len(),
        "deleted {deleted} of {}",
        planned.len()
    );
    assert_eq!(
        freed as u64, expected,
        "freed bytes vs the blocks the paths held"
    );
}

#[test]
fn bad_state_and_databases_exit_2_with_the_true_cause() {
    let (root, state, _) = store_with_run("badinput", 1, 1);
    let dir = root.parent().unwrap().to_owned();
    let code_err = |args: &[&str], state: &Path| {
        let out = Drydock::on(&root, state).args(args).run();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // --state-dir naming a regular file.
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (c, e) = code_err(&["runs"], &file);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("not a directory") && e.contains("a-file"), "{e}");
    // A name longer than a file name may be.
    let long = dir.join("n".repeat(300));
    let (c, e) = code_err(&["runs"], &long);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("255"), "{e}");
    // A runs database with a blob where text belongs.
    let st = Command::new("sqlite3")
        .arg(state.join("runs.sqlite"))
        .arg("UPDATE runs SET name = x'00ff00ff';")
        .status()
        .unwrap();
    assert!(st.success());
    let (c, e) = code_err(&["runs"], &state);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("runs.sqlite"), "{e}");
    // An empty Nix database.
    let empty = dir.join("empty-store");
    std::fs::create_dir_all(empty.join("nix/var/nix/db")).unwrap();
    std::fs::create_dir_all(empty.join("nix/store")).unwrap();
    std::fs::write(empty.join("nix/var/nix/db/db.sqlite"), b"").unwrap();
    let out = Drydock::on(&empty, &dir.join("state2"))
        .args(["gc", "--all", "--dry-run"])
        .run();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("is not a Nix database"), "{e}");
    // An unwritable state dir of the user's own, as an ordinary user: the cause is
    // permissions, not corruption.
    let locked = dir.join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::os::unix::fs::chown(&locked, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
    let as_nobody = |state: &Path| {
        Drydock::on(&root, state)
            .via(
                "setpriv",
                ["--reuid=65534", "--regid=65534", "--clear-groups"],
            )
            .arg("runs")
            .run()
    };
    let out = as_nobody(&locked);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("cannot write the runs database") && !e.contains("corrupt"),
        "{e}"
    );
    // A state dir of another user is refused before anything is read or written in it.
    let roots = dir.join("roots-state");
    std::fs::create_dir_all(&roots).unwrap();
    let out = as_nobody(&roots);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains(&format!("{} belongs to uid 0", roots.display())),
        "{e}"
    );
    assert!(!roots.join("runs.sqlite").exists());
}

#[test]
fn track_of_a_command_that_cannot_start_records_nothing() {
    let dir = scratch("nostart");
    let root = dir.join("store");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    let out = Drydock::on(&root, &state)
        .args(["track", "--", "/nonexistent/cmd"])
        .run();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cmd"));
    let out = Command::new("sqlite3")
        .arg(state.join("runs.sqlite"))
        .arg("SELECT count(*) FROM runs;")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[test]
fn sigterm_ends_track_after_its_command_has_exited() {
    let dir = scratch("trackterm");
    let root = dir.join("store");
    let state = dir.join("state");
    std::fs::create_dir_all(&root).unwrap();
    // The command exits at once but leaves a process holding its stdout, so track is still
    // busy after the command ended; SIGTERM then must end drydock with 130.
    let mut child = Drydock::on(&root, &state)
        .args(["track", "--", "sh", "-c", "sleep 21.37 & echo started"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "started");
    std::thread::sleep(Duration::from_millis(200));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "track ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    let _ = Command::new("pkill").args(["-f", "sleep 21.37"]).status();
}

#[test]
fn a_state_file_naming_other_processes_and_places_is_not_obeyed() {
    // A VM entry whose state.json was edited to name an unrelated process (with its true start
    // time, so liveness checks pass) as QEMU, owner and store server, and a directory elsewhere
    // as its cgroup: cleaning the entry up must signal nothing and remove nothing.
    let dir = scratch("hostile-state");
    let state = dir.join("state");
    let vm = state.join("vms/victim");
    std::fs::create_dir_all(&vm).unwrap();
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = bystander.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[19].parse().unwrap();
    let not_a_cgroup = dir.join("keep-me");
    std::fs::create_dir_all(&not_a_cgroup).unwrap();
    let doc = serde_json::json!({
        "name": "victim", "supervisor_pid": pid, "qemu_pid": pid, "server_pid": pid,
        "accel": "tcg", "memory_mib": 64, "started": 0,
        "cgroup": not_a_cgroup, "phase": "running",
        "qemu_start_ticks": null, "supervisor_start_ticks": ticks, "server_start_ticks": ticks,
    });
    std::fs::write(vm.join("state.json"), serde_json::to_vec(&doc).unwrap()).unwrap();
    for args in [&["vm", "stop", "victim"][..], &["vm", "list"][..]] {
        let out = Drydock::new().state(&state).args(args).run();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "{args:?} killed a process that is not the VM's"
        );
    }
    assert!(
        not_a_cgroup.is_dir(),
        "a directory that is no VM cgroup was removed"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}
