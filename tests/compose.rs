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
