//! The backdoor protocol (drydock-cluster's `Backdoor`) against real shells, as a guest runs
//! them on its console: busybox `sh` (the test guest's) and `bash --norc -s` (NixOS's
//! backdoor), each on a socketpair: calls with their stdout, stderr, status and deadline, 1 MiB
//! of binary output, replies sent a chunk per acknowledgement, calls queueing on one backdoor,
//! a command killed (with what it started) when its caller goes, a closed backdoor failing
//! calls at once, and interactive sessions that hand the console back. The protocol's pure
//! parts are unit-tested in `cluster/src/backdoor.rs`; `cluster::machines_talk_...` runs it in
//! guests.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drydock_cluster::{Backdoor, BackdoorError, CHUNK, READY_LINE, call_line, parse_reply};

#[test]
fn a_reply_waits_for_an_acknowledgement_after_each_chunk() {
    // No more than one chunk is ever in flight: without `:` lines the guest stops after the
    // first chunk (QEMU would drop what does not fit the socket), and each `:` releases one.
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let fd: OwnedFd = theirs.into();
    let fd2 = fd.try_clone().unwrap();
    // A call's marker is a nonce (32 hex digits, new for each call in `Backdoor::exec`).
    let nonce = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let mut child = Command::new("busybox")
        .args(["sh", "-s"])
        .stdin(Stdio::from(fd))
        .stdout(Stdio::from(fd2))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ours.write_all(call_line(nonce, "head -c 300000 /dev/zero", 30).as_bytes())
        .unwrap();
    fn read_for(ours: &mut UnixStream, got: &mut Vec<u8>, d: Duration) {
        let mut buf = [0u8; 65536];
        let end = Instant::now() + d;
        while Instant::now() < end {
            ours.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            if let Ok(n) = ours.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
    let mut got = Vec::new();
    read_for(&mut ours, &mut got, Duration::from_millis(1500));
    assert_eq!(
        got.len(),
        CHUNK,
        "only the first chunk before an acknowledgement"
    );
    let mut acks = 0;
    let end = format!("DRYDOCK-{nonce}-END\n");
    while !got.ends_with(end.as_bytes()) {
        ours.write_all(b":\n").unwrap();
        acks += 1;
        let before = got.len();
        read_for(&mut ours, &mut got, Duration::from_millis(300));
        assert!(
            got.len() - before <= CHUNK,
            "more than a chunk per acknowledgement"
        );
        assert!(acks < 100, "the reply never ended");
    }
    let line = String::from_utf8(got).unwrap();
    let r = parse_reply(nonce, line.trim_start_matches('\n'))
        .unwrap()
        .unwrap();
    assert_eq!((r.status, r.stdout.len()), (0, 300000));
    assert_eq!(acks, (line.len() - 1) / CHUNK);
    let _ = child.kill();
    let _ = child.wait();
}

/// A real shell on a socketpair, as the guest runs it on hvc0; killed on drop.
struct TestShell {
    b: Backdoor,
    child: std::process::Child,
}

impl Drop for TestShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::ops::Deref for TestShell {
    type Target = Backdoor;
    fn deref(&self) -> &Backdoor {
        &self.b
    }
}

fn shell(program: &[&str]) -> TestShell {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd: OwnedFd = theirs.into();
    let fd2 = fd.try_clone().unwrap();
    let script = format!(
        "echo booting; echo '{READY_LINE}'; exec {}",
        program.join(" ")
    );
    let child = Command::new("busybox")
        .args(["sh", "-c", &script])
        .stdin(Stdio::from(fd))
        .stdout(Stdio::from(fd2))
        .stderr(Stdio::null())
        .spawn()
        .expect("busybox");
    let mut seen = Vec::new();
    let b = Backdoor::wait_ready(ours, Duration::from_secs(10), &[], &mut |l| {
        seen.push(l.to_string())
    })
    .unwrap();
    assert_eq!(seen, ["booting"]);
    TestShell { b, child }
}

fn calls_work(b: &Backdoor) {
    let t = Duration::from_secs(20);
    let r = b.exec("echo out; echo err >&2; exit 3", t).unwrap();
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice(), r.status),
        (&b"out\n"[..], &b"err\n"[..], 3)
    );
    // Words joined as ssh does: a pipe, quotes, a syntax error is the command's failure.
    let r = b.exec("printf 'a b\\n' | tr a-z A-Z", t).unwrap();
    assert_eq!((r.stdout.as_slice(), r.status), (&b"A B\n"[..], 0));
    let r = b.exec("if then", t).unwrap();
    assert_ne!(r.status, 0);
    assert!(!r.stderr.is_empty());
    // 1 MiB of binary output, intact.
    let r = b
        .exec("f=$(mktemp); dd if=/dev/urandom bs=65536 count=16 2>/dev/null >$f; md5sum <$f >&2; cat $f; rm $f", t)
        .unwrap();
    assert_eq!(r.stdout.len(), 1 << 20);
    let md5 = String::from_utf8_lossy(&r.stderr).to_string();
    let mut p = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(&r.stdout).unwrap();
    let ours = String::from_utf8(p.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(
        md5.split_whitespace().next(),
        ours.split_whitespace().next()
    );
    // The deadline: 124, and the shell answers afterwards.
    let t0 = Instant::now();
    let r = b
        .exec("echo started; sleep 30", Duration::from_secs(1))
        .unwrap();
    assert_eq!((r.status, r.stdout.as_slice()), (124, &b"started\n"[..]));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let r = b.exec("echo still here", t).unwrap();
    assert_eq!((r.status, r.stdout.as_slice()), (0, &b"still here\n"[..]));
    // The command cannot eat the protocol's input.
    let r = b.exec("cat; echo done", t).unwrap();
    assert_eq!(r.stdout, b"done\n");
}

/// A caller that goes away: its command is killed in the guest at once (130), and the next
/// call is answered at once.
fn a_gone_caller_cancels_its_command(b: &Backdoor) {
    let (caller, ours) = UnixStream::pair().unwrap();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let call = s.spawn(|| {
            b.exec_for(
                "echo started; sleep 30",
                Duration::from_secs(60),
                Some(&ours),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        drop(caller);
        let r = call.join().unwrap().unwrap();
        assert_eq!((r.status, r.stdout.as_slice()), (130, &b"started\n"[..]));
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let t1 = Instant::now();
    let r = b.exec("echo next", Duration::from_secs(20)).unwrap();
    assert_eq!((r.status, r.stdout.as_slice()), (0, &b"next\n"[..]));
    assert!(t1.elapsed() < Duration::from_secs(5));
    // Everything the command started went with it (here, the shell's children are ours).
    let left = Command::new("pgrep")
        .args(["-f", "sleep 3[78]$"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&left.stdout)
    );
    // A caller that stays: nothing is cancelled.
    let (_caller, ours) = UnixStream::pair().unwrap();
    let r = b
        .exec_for("sleep 0.3; echo done", Duration::from_secs(20), Some(&ours))
        .unwrap();
    assert_eq!((r.status, r.stdout.as_slice()), (0, &b"done\n"[..]));
}

#[test]
fn a_gone_caller_cancels_its_command_in_busybox_and_bash() {
    a_gone_caller_cancels_its_command(&shell(&["busybox", "sh"]));
    a_gone_caller_cancels_its_command(&shell(&["bash", "--norc", "-s"]));
}

#[test]
fn a_closed_backdoor_fails_calls_at_once_saying_why() {
    let b = Arc::new(shell(&["busybox", "sh"]));
    let b2 = b.clone();
    let t0 = Instant::now();
    let call = std::thread::spawn(move || b2.exec("sleep 30", Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(300));
    b.close("its store server died");
    let e = call.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("its store server died"), "{e}");
    let e = b.exec("true", Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("its store server died"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn busybox_sh_runs_calls_completely_with_status_and_deadline() {
    calls_work(&shell(&["busybox", "sh"]));
}

#[test]
fn bash_runs_the_same_calls() {
    // As NixOS's backdoor runs it: `bash --norc` reading commands from its stdin.
    calls_work(&shell(&["bash", "--norc", "-s"]));
}

#[test]
fn calls_on_one_backdoor_queue() {
    let b = Arc::new(shell(&["busybox", "sh"]));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let b = b.clone();
            std::thread::spawn(move || {
                b.exec(&format!("sleep 0.2; echo {i}"), Duration::from_secs(20))
                    .unwrap()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let r = t.join().unwrap();
        assert_eq!((r.status, r.stdout), (0, format!("{i}\n").into_bytes()));
    }
}

#[test]
fn a_shell_session_relays_and_hands_the_console_back() {
    for program in [&["busybox", "sh"][..], &["bash", "--norc", "-s"]] {
        let b = Arc::new(shell(program));
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        // A session the user ends with `exit`; what they typed after it is never run.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.shell(&theirs, "m1# ", Some((40, 100)), &mut || {}));
        let mut w = &ours;
        w.write_all(
            format!(
                "echo hello from $(hostname -s 2>/dev/null || echo guest)\nexit\ntouch {}\n",
                marker.display()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut got = Vec::new();
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (&ours).read_to_end(&mut got).unwrap();
        t.join().unwrap().unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("m1# "), "{text:?}");
        assert!(text.contains("hello from"), "{text:?}");
        assert!(!text.contains("SHELL-END"), "{text:?}");
        let r = b.exec("echo after", Duration::from_secs(20)).unwrap();
        assert_eq!(r.stdout, b"after\n");
        assert!(
            !marker.exists(),
            "input after `exit` reached the backdoor's shell"
        );
        // A client that just leaves: the session's shell is told to exit.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.shell(&theirs, "m1# ", Some((40, 100)), &mut || {}));
        (&ours).write_all(b"cd /tmp\n").unwrap();
        ours.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        (&ours).read_to_end(&mut got).unwrap();
        t.join().unwrap().unwrap();
        let r = b.exec("pwd", Duration::from_secs(20)).unwrap();
        assert_ne!(
            r.stdout, b"/tmp\n",
            "the session's `cd` stays in the session"
        );
        assert_eq!(r.status, 0);
        // A client that leaves while a command runs in the session: calls wait for it to
        // end (or give up at their own deadline), and the backdoor stays usable.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.shell(&theirs, "m1# ", None, &mut || {}));
        (&ours).write_all(b"sleep 3\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(ours);
        let e = b.exec("true", Duration::from_millis(500)).unwrap_err();
        assert!(matches!(e, BackdoorError::Busy(_)), "{e}");
        let r = b
            .exec("echo after the session", Duration::from_secs(20))
            .unwrap();
        assert_eq!(r.stdout, b"after the session\n");
        t.join().unwrap().unwrap();
    }
}

/// `exec`'s encodings (drydock-cluster's `GuestCommand` and `with_stdin`) on a real shell: an
/// argv keeps every word, one word is a command line, stdin arrives whole with its end.
fn commands_keep_their_words_and_stdin(b: &Backdoor) {
    use drydock_cluster::{GuestCommand, with_stdin};
    let t = Duration::from_secs(60);
    let run = |words: &[&str], stdin: &[u8]| {
        let c = GuestCommand::from_words(words.iter().map(|w| w.to_string()).collect());
        b.exec(&with_stdin(&c.script(), stdin), t).unwrap()
    };
    let r = run(&["sh", "-c", "exit 3"], b"");
    assert_eq!(r.status, 3);
    let r = run(&["echo", "a   b"], b"");
    assert_eq!(r.stdout, b"a   b\n");
    let r = run(&["sh", "-c", "echo one; echo two"], b"");
    assert_eq!(r.stdout, b"one\ntwo\n");
    let r = run(&["printf", "%s\\n", "x y"], b"");
    assert_eq!(r.stdout, b"x y\n");
    let r = run(&["echo", "it's", "$HOME", "*", "`x`"], b"");
    assert_eq!(r.stdout, b"it's $HOME * `x`\n");
    let r = run(&["echo one; echo two"], b"");
    assert_eq!(r.stdout, b"one\ntwo\n");
    let r = run(&["cat"], b"z\n");
    assert_eq!((r.status, r.stdout.as_slice()), (0, &b"z\n"[..]));
    // Its own exit status, through the temporary file's removal.
    let r = run(&["cat; exit 7"], b"last line without a newline");
    assert_eq!(
        (r.status, r.stdout.as_slice()),
        (7, &b"last line without a newline"[..])
    );
    // 1 MiB of binary stdin through cat, byte for byte.
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t0 = Instant::now();
    let r = run(&["cat"], &data);
    eprintln!("1 MiB through cat: {:?}", t0.elapsed());
    assert_eq!(r.status, 0, "{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.stdout == data, "1 MiB through cat differs");
    // The temporary file is gone once the command ended.
    let r = run(&["cat >/dev/null; echo \"$drydock_in\""], b"x");
    let file = String::from_utf8(r.stdout).unwrap();
    let r = b.exec(&format!("ls {}", file.trim()), t).unwrap();
    assert_ne!(r.status, 0, "{file} is left");
    let r = run(
        &[
            "sh",
            "-c",
            "ls -l /proc/$$/fd/0 | grep -q /tmp/tmp. && echo file",
        ],
        b"x",
    );
    assert_eq!(
        r.stdout,
        b"file\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn busybox_sh_keeps_words_and_stdin() {
    commands_keep_their_words_and_stdin(&shell(&["busybox", "sh"]));
}

#[test]
fn bash_keeps_words_and_stdin() {
    commands_keep_their_words_and_stdin(&shell(&["bash", "--norc", "-s"]));
}

#[test]
fn a_tty_session_runs_its_command_and_leaves_its_status() {
    // `exec -t`: the command in a session, its input relayed, its status in a file.
    use drydock_cluster::{GuestCommand, tty_script, tty_status_file};
    for program in [&["busybox", "sh"][..], &["bash", "--norc", "-s"]] {
        let b = Arc::new(shell(program));
        let f = tty_status_file(&format!("test-{}", std::process::id()));
        let cmd = GuestCommand::Argv(vec![
            "sh".into(),
            "-c".into(),
            "read x; echo got $x; exit 5".into(),
        ]);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let b2 = b.clone();
        let script = tty_script(&cmd.script(), &f);
        let t = std::thread::spawn(move || b2.run_tty(&theirs, &script, None, &mut || {}));
        (&ours).write_all(b"hello\n").unwrap();
        let mut got = Vec::new();
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("got hello") {
            let n = (&ours).read(&mut buf).unwrap();
            assert!(n > 0, "{:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        // The session ends with its command (the client leaving would not end it).
        (&ours).read_to_end(&mut got).unwrap();
        t.join().unwrap().unwrap();
        let r = b
            .exec(&format!("cat {f} && rm -f {f}"), Duration::from_secs(20))
            .unwrap();
        assert_eq!(r.stdout, b"5\n", "{:?}", String::from_utf8_lossy(&got));
    }
}
