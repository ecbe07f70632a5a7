//! What a docker-compose user's fingers and a first-time user's eyes expect (the issue of that
//! name), against real QEMU (TCG) and one-machine clusters of the test system: `exec` keeps
//! each word of an argv and forwards stdin (1 MiB of binary through `cat`), says when its
//! timeout hit, `cp` copies a directory both ways with its modes; compose's option places
//! (`-p`/`-f` before the subcommand, `logs -f` following, `up -d`, `ls`); one project per
//! composition file; a run count that stays put across no-op reloads; and one answer for a
//! cluster that is not up. Needs root for the store server's sandbox, and the test guest's
//! kernel (`scripts/guest/build-initrd`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::{Checks, Ran};
use crate::vmcommon::{Cluster, text};

const ONE: &str = "server = { system = sys { }; memorySize = 256; };";

/// `exec -f FILE server [OPTIONS] -- WORDS...`.
fn exec(c: &Cluster, options: &[&str], words: &[&str]) -> Ran {
    c.verb("exec")
        .arg("server")
        .args(options)
        .arg("--")
        .args(words)
        .run()
}

fn assert_out(o: &Ran, code: i32, stdout: &str) {
    assert_eq!(
        (o.code(), text(&o.stdout)),
        (Some(code), stdout.to_string()),
        "stderr: {}",
        text(&o.stderr)
    );
}

#[test]
fn exec_keeps_words_and_stdin_and_cp_copies_both_ways() {
    let c = Cluster::named("words").machines(ONE).up();
    let mut checks = Checks::new();
    checks.check("sh -c 'exit 3' is 3", || {
        assert_out(&exec(&c, &[], &["sh", "-c", "exit 3"]), 3, "");
    });
    checks.check("echo 'a   b' keeps its spaces", || {
        assert_out(&exec(&c, &[], &["echo", "a   b"]), 0, "a   b\n");
    });
    checks.check("sh -c 'echo one; echo two' prints both", || {
        assert_out(
            &exec(&c, &[], &["sh", "-c", "echo one; echo two"]),
            0,
            "one\ntwo\n",
        );
    });
    checks.check("printf '%s\\n' 'x y'", || {
        assert_out(&exec(&c, &[], &["printf", "%s\\n", "x y"]), 0, "x y\n");
    });
    checks.check("one word is a command line", || {
        assert_out(&exec(&c, &[], &["echo one | tr a-z A-Z"]), 0, "ONE\n");
    });
    checks.check("echo z | exec server -- cat", || {
        let o = c
            .verb("exec")
            .args(["server", "--", "cat"])
            .input(b"z\n".to_vec())
            .run();
        assert_out(&o, 0, "z\n");
    });
    checks.check("1 MiB of binary stdin through cat, intact", || {
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let t = std::time::Instant::now();
        let o = c
            .verb("exec")
            .args(["server", "--timeout", "300", "--", "cat"])
            .input(data.clone())
            .run();
        eprintln!("1 MiB through cat: {:?}", t.elapsed());
        assert_eq!(o.code(), Some(0), "{}", text(&o.stderr));
        assert!(
            o.stdout == data,
            "{} bytes came back, not those",
            o.stdout.len()
        );
    });
    checks.check("exec --json", || {
        let o = c
            .drydock()
            .json()
            .args(["exec", "-f"])
            .arg(c.file())
            .args(["server", "--", "sh", "-c", "echo out; echo err >&2; exit 4"])
            .run();
        assert_eq!(o.code(), Some(4), "{}", text(&o.stderr));
        let v = o.stdout_json();
        assert_eq!(
            (&v["status"], &v["stdout"], &v["stderr"], &v["timed_out"]),
            (
                &serde_json::json!(4),
                &serde_json::json!("out\n"),
                &serde_json::json!("err\n"),
                &serde_json::json!(false)
            )
        );
    });
    checks.check("a timeout says so and is 124", || {
        let o = exec(&c, &["--timeout", "2"], &["sleep", "10"]);
        assert_eq!(o.code(), Some(124));
        assert!(
            o.stderr_str()
                .contains("did not finish on words.server within 2 s"),
            "{}",
            o.stderr_str()
        );
    });
    checks.check("cp a directory in and out, modes kept", || {
        let src = c.dir().join("tree");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/run"), b"#!/bin/sh\necho ran\n").unwrap();
        std::fs::set_permissions(src.join("sub/run"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::set_permissions(src.join("sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let bin: Vec<u8> = (0..=255u8).cycle().take(70000).collect();
        std::fs::write(src.join("bin"), &bin).unwrap();
        std::os::unix::fs::symlink("sub/run", src.join("link")).unwrap();
        let to = c.verb("cp").arg(&src).arg("server:/tmp/copied").run();
        assert_eq!(to.code(), Some(0), "{}", to.stderr_str());
        let o = exec(
            &c,
            &[],
            &["sh", "-c", "stat -c '%a %n' /tmp/copied/sub /tmp/copied/sub/run; readlink /tmp/copied/link; md5sum < /tmp/copied/bin; /tmp/copied/sub/run"],
        );
        let want_md5 = {
            let mut p = std::process::Command::new("md5sum")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            p.stdin.take().unwrap().write_all(&bin).unwrap();
            text(&p.wait_with_output().unwrap().stdout)
        };
        assert_out(
            &o,
            0,
            &format!(
                "700 /tmp/copied/sub\n750 /tmp/copied/sub/run\nsub/run\n{}  -\nran\n",
                want_md5.split_whitespace().next().unwrap()
            ),
        );
        // Into an existing directory: under its own name. And back out, into a directory.
        let to = c.verb("cp").arg(&src).arg("server:/tmp").run();
        assert_eq!(to.code(), Some(0), "{}", to.stderr_str());
        let back = c.dir().join("back");
        std::fs::create_dir(&back).unwrap();
        let from = c.verb("cp").arg("server:/tmp/tree").arg(&back).run();
        assert_eq!(from.code(), Some(0), "{}", from.stderr_str());
        check_tree(&back.join("tree"), &bin);
        // Out to a new name.
        let from = c
            .verb("cp")
            .arg("server:/tmp/copied/")
            .arg(c.dir().join("again"))
            .run();
        assert_eq!(from.code(), Some(0), "{}", from.stderr_str());
        check_tree(&c.dir().join("again"), &bin);
        // A missing source is bad input, named.
        let o = c.verb("cp").arg("server:/nonexistent").arg(&back).run();
        assert_eq!(o.code(), Some(2), "{}", o.stderr_str());
        assert!(o.stderr_str().contains("/nonexistent: no such file"), "{}", o.stderr_str());
    });
    drop(checks);
    c.down();
}

/// A copy of the tree made in [`exec_keeps_words_and_stdin_and_cp_copies_both_ways`].
fn check_tree(root: &Path, bin: &[u8]) {
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        (mode("sub"), mode("sub/run")),
        (0o700, 0o750),
        "{}",
        root.display()
    );
    assert_eq!(std::fs::read(root.join("bin")).unwrap(), bin);
    assert_eq!(
        std::fs::read_link(root.join("link")).unwrap(),
        Path::new("sub/run")
    );
}

#[test]
fn compose_option_places_ls_and_one_file_per_project() {
    let c = Cluster::named("places").machines(ONE).up();
    let file = std::fs::canonicalize(c.file()).unwrap();
    let mut checks = Checks::new();
    checks.check("-p and -f before the subcommand", || {
        let o = c.drydock().args(["-p", "places", "ps"]).run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        assert!(o.stdout_str().contains("server"), "{}", o.stdout_str());
        let o = c
            .drydock()
            .arg("-f")
            .arg(c.file())
            .args(["exec", "server", "--", "true"])
            .run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
    });
    checks.check("several -f are refused, saying why", || {
        let o = c
            .drydock()
            .arg("-f")
            .arg(c.file())
            .arg("ps")
            .arg("-f")
            .arg(c.file())
            .run();
        assert_eq!(o.code(), Some(2));
        assert!(
            o.stderr_str()
                .contains("a cluster has one composition file"),
            "{}",
            o.stderr_str()
        );
    });
    checks.check("ls lists the cluster with its file", || {
        let o = c.drydock().json().arg("ls").run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        let v = o.stdout_json();
        let row = &v["clusters"][0];
        assert_eq!(
            (&row["name"], &row["file"], &row["machines"]),
            (
                &serde_json::json!("places"),
                &serde_json::json!(file.display().to_string()),
                &serde_json::json!(1)
            ),
            "{v}"
        );
        assert!(row["since"].as_i64().is_some(), "{v}");
        let o = c.drydock().arg("ls").run();
        assert!(o.stdout_str().contains("places"), "{}", o.stdout_str());
    });
    checks.check("logs -f follows a line printed later", || {
        let log = c.dir().join("follow.out");
        let mut follow = c
            .drydock()
            .args(["-p", "places", "logs", "-f", "server"])
            .stdout(std::fs::File::create(&log).unwrap())
            .spawn();
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(
            follow.try_wait().unwrap().is_none(),
            "logs -f ended at once"
        );
        let o = exec(&c, &[], &["sh", "-c", "echo LATER-LINE >/dev/console"]);
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        crate::vmcommon::wait_until(
            "logs -f prints the new line",
            std::time::Duration::from_secs(30),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("server │ LATER-LINE")
            },
        );
        assert!(follow.try_wait().unwrap().is_none(), "logs -f ended");
        follow.signal(libc::SIGINT);
        follow.wait_within(std::time::Duration::from_secs(10));
    });
    checks.check("logs --tail 1 -t", || {
        let o = c
            .drydock()
            .args(["-p", "places", "logs", "--tail", "1", "-t"])
            .run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        let lines: Vec<String> = o.stdout_str().lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let re = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z server │ ").unwrap();
        assert!(re.is_match(&lines[0]), "{lines:?}");
    });
    checks.check("up -d is --detach", || {
        let o = c.verb("up").args(["-d", "--accel", "tcg"]).run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        assert!(
            o.stderr_str().contains("nothing to do"),
            "{}",
            o.stderr_str()
        );
    });
    checks.check("another file with the same project name is refused", || {
        let other = c.dir().join("elsewhere/places");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::copy(c.file(), other.join("drydock.nix")).unwrap();
        for verb in [
            &["exec", "server", "--", "true"][..],
            &["up", "--dry-run"],
            &["ps"],
            &["down"],
        ] {
            let o = c
                .drydock()
                .arg("-f")
                .arg(other.join("drydock.nix"))
                .args(verb)
                .run();
            assert_eq!(o.code(), Some(2), "{verb:?}: {}", o.stderr_str());
            let e = o.stderr_str();
            assert!(
                e.contains(&format!("is up from {}", file.display()))
                    && e.contains(&other.join("drydock.nix").display().to_string())
                    && e.contains("-p NAME"),
                "{verb:?}: {e}"
            );
        }
    });
    checks.check(
        "a cluster that is not up is named with the one that is",
        || {
            let o = c.drydock().args(["-p", "ghost", "ps"]).run();
            assert_eq!(o.code(), Some(2));
            assert!(
                o.stderr_str()
                    .contains("the cluster ghost is not up (the cluster up is places)"),
                "{}",
                o.stderr_str()
            );
        },
    );
    drop(checks);
    c.down();
}

#[test]
fn one_answer_for_a_cluster_that_is_not_up() {
    // No cluster runs: every command on one says the same, exit 2.
    let c = Cluster::named("ghost").machines(ONE).write();
    let want = "the cluster ghost is not up (no cluster is up)";
    let mut checks = Checks::new();
    for verb in [
        &["ps"][..],
        &["down"],
        &["logs"],
        &["logs", "-f"],
        &["exec", "server", "--", "true"],
        &["wait", "server", "--succeeds", "true", "--timeout", "1"],
        &["shell", "server"],
        &["cp", "server:/etc/hostname", "."],
    ] {
        checks.check(&format!("{verb:?}"), || {
            let o = c.verb(verb[0]).args(&verb[1..]).run();
            assert_eq!(o.code(), Some(2), "{}", o.stderr_str());
            assert!(o.stderr_str().contains(want), "{}", o.stderr_str());
        });
    }
    checks.check("a directory without drydock.nix says so", || {
        let empty = c.dir().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let o = c
            .drydock()
            .args(["exec", "server", "--", "true"])
            .with(move |cmd| {
                cmd.current_dir(&empty);
            })
            .run();
        assert_eq!(o.code(), Some(2));
        assert!(
            o.stderr_str().contains("no drydock.nix here"),
            "{}",
            o.stderr_str()
        );
    });
    checks.check("up with a misspelt machine lists the real ones", || {
        let o = c.verb("up").args(["sever", "--dry-run"]).run();
        assert_eq!(o.code(), Some(2), "{}", o.stderr_str());
        assert!(
            o.stderr_str()
                .contains("the machine \"sever\" is not in the composition (it has server)"),
            "{}",
            o.stderr_str()
        );
    });
}

#[test]
fn runs_stay_readable_across_no_op_reloads() {
    let c = Cluster::named("tally")
        .machines(
            "a = { system = sys { }; memorySize = 256; };
             b = { system = sys { }; memorySize = 256; };",
        )
        .up();
    let runs = |c: &Cluster| -> Vec<serde_json::Value> {
        let o = c.drydock().json().arg("runs").run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        o.stdout_json()["runs"].as_array().unwrap().clone()
    };
    let after_up = runs(&c);
    let mut checks = Checks::new();
    checks.check("the machines are one run, named for the cluster", || {
        let vms: Vec<&serde_json::Value> = after_up.iter().filter(|r| r["kind"] == "vm").collect();
        assert_eq!(vms.len(), 1, "{after_up:#?}");
        assert_eq!(vms[0]["name"], "machines of tally");
        let id = vms[0]["id"].as_i64().unwrap().to_string();
        let o = c.drydock().json().args(["runs", "show", &id]).run();
        let folders: Vec<String> = o.stdout_json()["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["path"].as_str().unwrap().to_string())
            .collect();
        assert!(
            folders.iter().any(|f| f.ends_with("vms/tally.a"))
                && folders.iter().any(|f| f.ends_with("vms/tally.b")),
            "{folders:?}"
        );
        for b in after_up.iter().filter(|r| r["kind"] == "build") {
            assert_eq!(b["name"], "up tally", "{b}");
            let cmd: Vec<&str> = b["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap())
                .collect();
            assert!(
                cmd.contains(&"up") && !cmd.iter().any(|w| w.contains("nix-build")),
                "{cmd:?}"
            );
        }
    });
    checks.check("two no-op reloads record no run", || {
        for _ in 0..2 {
            let o = c.verb("up").run();
            assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
            assert!(
                o.stderr_str().contains("nothing new: no run recorded"),
                "{}",
                o.stderr_str()
            );
        }
        let now = runs(&c);
        assert_eq!(now.len(), after_up.len(), "{now:#?}");
    });
    checks.check("runs without --store use the store of the runs", || {
        let o = crate::common::Drydock::new()
            .state(c.state())
            .env_remove("NIX_STORE_DIR")
            .json()
            .arg("runs")
            .run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        assert!(
            o.stderr_str()
                .contains(&format!("using --store {}", c.store().display())),
            "{}",
            o.stderr_str()
        );
        assert_eq!(
            o.stdout_json()["runs"].as_array().unwrap().len(),
            after_up.len()
        );
    });
    checks.check("du's total holds every run", || {
        let o = c.drydock().json().arg("du").run();
        assert_eq!(o.code(), Some(0), "{}", o.stderr_str());
        let v = o.stdout_json();
        let total = v["total"].as_u64().unwrap();
        for r in v["by_run"].as_array().unwrap() {
            assert!(r[2].as_u64().unwrap() <= total, "{v}");
        }
    });
    drop(checks);
    c.down();
    let ended = runs(&c);
    let vm = ended.iter().find(|r| r["kind"] == "vm").unwrap();
    assert!(
        !vm["ended_at"].is_null(),
        "down ends the machines' run: {vm}"
    );
}

#[test]
fn up_says_progress_in_plurals_without_store_paths_and_logs_plain_text() {
    let c = Cluster::named("polish").machines(ONE).write();
    crate::vmcommon::guest_ready();
    let up = c
        .verb("up")
        .args(["-d", "--accel", "tcg", "--timeout", "300"])
        .run();
    assert_eq!(up.code(), Some(0), "{}", up.stderr_str());
    let err = up.stderr_str();
    let mut checks = Checks::new();
    checks.check("one machine is said in the singular", || {
        assert!(err.contains("(1 machine, owner pid"), "{err}");
    });
    checks.check(
        "the boot's progress: each machine ready, with seconds",
        || {
            let re = regex::Regex::new(r"drydock: server ready after \d+\.\d s").unwrap();
            assert!(re.is_match(&err), "{err}");
        },
    );
    checks.check("nix-build's store paths only with -v", || {
        let paths: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("/nix/store/"))
            .collect();
        assert!(paths.is_empty(), "{err}");
        assert!(up.stdout.is_empty(), "{}", up.stdout_str());
    });
    checks.check("drydock.log is plain text", || {
        let log = std::fs::read(c.state().join("clusters/polish/drydock.log")).unwrap();
        assert!(!log.contains(&0x1b), "{}", text(&log));
    });
    drop(checks);
    c.down();
}
