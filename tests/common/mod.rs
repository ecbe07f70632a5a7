//! Shared helpers of every test module: [`Drydock`], the one way to run the real `drydock`
//! binary; [`Checks`], soft checks for long scenario tests; real chroot Nix stores built with
//! `nix-build --store ROOT`.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The options every fixture build gets: `/bin/sh` in the sandbox is busybox, and no binary
/// cache (nothing to fetch offline, and no retries to wait for). Only these throwaway fixtures
/// use `/bin/sh` as builder, on their own command line; the test system (`scripts/guest`) needs
/// neither option. The tests count these fixtures' store paths exactly, so they keep the one
/// builder that adds no path to the store.
pub const NIX_BUILD_OPTIONS: [&str; 6] = [
    "--option",
    "sandbox-paths",
    "/bin/sh=/bin/busybox",
    "--option",
    "substituters",
    "",
];

/// A fresh, empty directory for one test under Cargo's per-target temporary directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("drydock-{name}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clean old scratch dir");
    }
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The Nix prelude for fixtures: `mk name deps script` is a plain derivation built with
/// `/bin/sh` (busybox inside the sandbox).
pub const PRELUDE: &str = r#"
  mk = name: deps: script: derivation {
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
"#;

/// `nix-build --store ROOT` of a Nix expression (written to `ROOT/../NAME.nix`). With
/// `out_link` the result links are made there (they become indirect GC roots); without, no
/// link is made. Returns the output paths printed.
pub fn nix_build(root: &Path, file_name: &str, expr: &str, out_link: Option<&Path>) -> Vec<String> {
    let file = root.parent().unwrap().join(format!("{file_name}.nix"));
    std::fs::write(&file, expr).unwrap();
    let mut cmd = Command::new("nix-build");
    cmd.arg("--store").arg(root).arg(&file);
    cmd.args(NIX_BUILD_OPTIONS);
    match out_link {
        Some(l) => cmd.arg("-o").arg(l),
        None => cmd.arg("--no-out-link"),
    };
    let out = cmd.output().expect("run nix-build");
    assert!(
        out.status.success(),
        "nix-build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The shell command line of `nix-build --store ROOT FILE` with the fixtures' options and
/// `extra` arguments, for tests that run it under `drydock track -- sh -c ...`.
pub fn nix_build_cmd(root: &Path, file: &Path, extra: &str) -> String {
    let options = NIX_BUILD_OPTIONS.map(|o| if o.is_empty() { "''" } else { o });
    format!(
        "nix-build --store {} {} {} {extra}",
        root.display(),
        file.display(),
        options.join(" ")
    )
}

/// `drydock track -- sh -c CMD`, which must succeed.
pub fn track_ok(root: &Path, state: &Path, cmd: &str) {
    Drydock::on(root, state)
        .args(["track", "--", "sh", "-c", cmd])
        .run()
        .ok();
}

/// Run `nix-store --store ROOT ARGS...` and return stdout lines; panics on failure.
pub fn nix_store(root: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(root)
        .args(args)
        .output()
        .expect("run nix-store");
    assert!(
        out.status.success(),
        "nix-store {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The base names of `nix-store --gc --print-dead` that are store paths (Nix also prints and
/// removes junk such as stray `.lock` files; those are compared separately).
pub fn nix_print_dead(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = nix_store(root, &["--gc", "--print-dead"])
        .into_iter()
        .filter(|l| is_store_path(l))
        .collect();
    v.sort();
    v
}

/// Whether `s` is `/nix/store/<32 base32>-<name>`.
pub fn is_store_path(s: &str) -> bool {
    let Some(base) = s.strip_prefix("/nix/store/") else {
        return false;
    };
    base.len() > 33
        && !base.contains('/')
        && base.as_bytes()[32] == b'-'
        && base[..32]
            .bytes()
            .all(|b| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&b))
}

/// Every path registered in the store, sorted (read through drydock's read-only reader).
pub fn valid_paths(root: &Path) -> Vec<String> {
    let layout = drydock_gc::StoreLayout::chroot(root);
    let db = drydock_gc::NixDb::open(&layout).expect("open Nix db");
    let snap = db.snapshot().expect("snapshot");
    let mut v: Vec<String> = (0..snap.len() as drydock_gc::Node)
        .map(|n| layout.logical(&snap.path(n)))
        .collect();
    v.sort();
    v
}

/// An ordinary user made for one test (removed on drop); `useradd` needs root.
pub struct TempUser {
    pub name: String,
}

impl TempUser {
    pub fn create() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ddt{}x{n}", std::process::id() % 100000);
        let st = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", &name])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
        Self { name }
    }

    /// drydock as this user: a copy of the binary it can read, under `setpriv` with fresh
    /// credentials from /etc/group as a login would give; the caller adds the arguments and the
    /// environment.
    pub fn drydock(&self) -> Drydock {
        Drydock::new().binary(&copy_of_binary()).via(
            "setpriv",
            [
                &format!("--reuid={}", self.name),
                &format!("--regid={}", self.name),
                "--init-groups",
                "--",
            ],
        )
    }

    /// This user's uid.
    pub fn uid(&self) -> u32 {
        let out = Command::new("id")
            .args(["-u", &self.name])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// Another program than drydock run as this user, the same way as [`TempUser::drydock`]
    /// (what another local user would do with drydock's sockets and files).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={}", self.name),
            &format!("--regid={}", self.name),
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    }

    /// Give `path` and everything under it to this user.
    pub fn own(&self, path: &Path) {
        let st = Command::new("chown")
            .args(["-R", &format!("{0}:{0}", self.name)])
            .arg(path)
            .status()
            .expect("chown");
        assert!(st.success(), "chown -R {} {}", self.name, path.display());
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// The test binary's directory may not be readable by other users; put a copy where it is.
pub fn copy_of_binary() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("doctor-bin");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("drydock");
        // A copy per run, renamed into place: a copy another test process runs cannot be
        // overwritten (ETXTBSY).
        let tmp = dir.join(format!("drydock.{}", std::process::id()));
        std::fs::copy(bin(), &tmp).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    })
    .clone()
}

/// Whether the tests run as root (the effective user of this process).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                == Some("0")
        })
        .unwrap_or(false)
}

/// The `drydock` binary Cargo built for these tests (the one place that names it).
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_drydock"))
}

/// A change [`Drydock::with`] makes to the command.
type Tweak = Box<dyn FnOnce(&mut Command)>;

/// The one way the tests run drydock: the binary with arguments in the order given, an
/// environment, optionally under a wrapper program (`setpriv`, a shell that enters a cgroup) and
/// a deadline. [`Drydock::run`] runs it to its end and captures its output (stdin empty unless
/// [`Drydock::input`] gives one); [`Drydock::spawn`] starts a long-running one (`up`, `track`
/// of a command the test signals, a foreground VM).
///
/// ```ignore
/// let v = Drydock::on(&root, &state).json().args(["gc", "--all"]).run().ok().stdout_json();
/// ```
pub struct Drydock {
    program: PathBuf,
    wrapper: Vec<OsString>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    tweaks: Vec<Tweak>,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    input: Option<Vec<u8>>,
    timeout: Option<Duration>,
}

impl Default for Drydock {
    fn default() -> Self {
        Self::new()
    }
}

impl Drydock {
    /// The binary, with no arguments yet.
    pub fn new() -> Drydock {
        Drydock {
            program: bin().to_path_buf(),
            wrapper: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            tweaks: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
            input: None,
            timeout: None,
        }
    }

    /// `drydock --store ROOT --state-dir STATE`, what most tests run.
    pub fn on(root: &Path, state: &Path) -> Drydock {
        Drydock::new().store(root).state(state)
    }

    /// Run this copy of the binary instead (one other users can read).
    pub fn binary(mut self, path: &Path) -> Self {
        self.program = path.to_path_buf();
        self
    }

    /// Run the binary under `program ARGS... drydock ...` (e.g. `setpriv --reuid=...`).
    pub fn via<I, S>(mut self, program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.wrapper = std::iter::once(OsString::from(program))
            .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
            .collect();
        self
    }

    /// `--store ROOT`.
    pub fn store(self, root: &Path) -> Self {
        self.arg("--store").arg(root)
    }

    /// `--state-dir DIR`.
    pub fn state(self, dir: &Path) -> Self {
        self.arg("--state-dir").arg(dir)
    }

    /// `--json`.
    pub fn json(self) -> Self {
        self.arg("--json")
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Change the command some other way, after everything above (for an environment a test
    /// sets up for Nix and drydock alike).
    pub fn with(mut self, f: impl FnOnce(&mut Command) + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    pub fn stdin(mut self, s: impl Into<Stdio>) -> Self {
        self.stdin = Some(s.into());
        self
    }

    pub fn stdout(mut self, s: impl Into<Stdio>) -> Self {
        self.stdout = Some(s.into());
        self
    }

    pub fn stderr(mut self, s: impl Into<Stdio>) -> Self {
        self.stderr = Some(s.into());
        self
    }

    /// What [`Drydock::run`] writes to its stdin (then closed).
    pub fn input(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.input = Some(bytes.into());
        self
    }

    /// [`Drydock::run`] kills it and fails the test if it has not ended after `limit`.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// `drydock ARGS` for messages.
    fn describe(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        format!("drydock {}", args.join(" "))
    }

    /// The command, its stdio not set yet where the test did not set it.
    fn command(&mut self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        for t in self.tweaks.drain(..) {
            t(&mut cmd);
        }
        if let Some(s) = self.stdin.take() {
            cmd.stdin(s);
        }
        if let Some(s) = self.stdout.take() {
            cmd.stdout(s);
        }
        if let Some(s) = self.stderr.take() {
            cmd.stderr(s);
        }
        cmd
    }

    /// The command as built so far (for a caller that must not panic, such as a `Drop`).
    pub fn into_command(mut self) -> Command {
        self.command()
    }

    /// Run it to its end: its exit status and captured output (stdout and stderr are captured
    /// unless set; stdin is empty unless set or given by [`Drydock::input`]).
    pub fn run(mut self) -> Ran {
        let what = self.describe();
        let (defaults, input, timeout) = (
            (
                self.stdin.is_none(),
                self.stdout.is_none(),
                self.stderr.is_none(),
            ),
            self.input.take(),
            self.timeout,
        );
        let mut cmd = self.command();
        if defaults.0 {
            cmd.stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        }
        if defaults.1 {
            cmd.stdout(Stdio::piped());
        }
        if defaults.2 {
            cmd.stderr(Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        if let (Some(bytes), Some(mut w)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = w.write_all(&bytes);
            });
        }
        let output = match timeout {
            None => child.wait_with_output(),
            Some(limit) => {
                let pid = child.id();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(child.wait_with_output());
                });
                rx.recv_timeout(limit).unwrap_or_else(|_| {
                    // Not reaped yet (its waiter still waits), so the pid is still its.
                    let _ = drydock_gc::send_signal(pid, libc::SIGKILL);
                    panic!("{what} did not end within {limit:?}")
                })
            }
        }
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        Ran { output, what }
    }

    /// Start it and return at once (stdio inherited unless set); the process is killed if the
    /// returned handle is dropped while it still runs.
    pub fn spawn(mut self) -> Spawned {
        let what = self.describe();
        let child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Spawned {
            child: Some(child),
            what,
        }
    }
}

/// A finished drydock: its [`Output`] (through `Deref`) and the helpers tests use on it.
#[derive(Debug)]
pub struct Ran {
    pub output: Output,
    /// `drydock ARGS`, for messages.
    pub what: String,
}

impl Deref for Ran {
    type Target = Output;
    fn deref(&self) -> &Output {
        &self.output
    }
}

impl Ran {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// It must have exited with `code`; the message has its stdout and stderr.
    pub fn exit(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            Some(code),
            "{}: stdout {} stderr {}",
            self.what,
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }

    /// It must have exited with 0.
    pub fn ok(self) -> Self {
        self.exit(0)
    }

    /// Its stdout as JSON (failing the test, with both outputs, if it is not).
    pub fn stdout_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not JSON ({e}): {}\nstderr: {}",
                self.what,
                self.stdout_str(),
                self.stderr_str()
            )
        })
    }
}

/// A drydock started by [`Drydock::spawn`]: the [`Child`] (through `Deref`), killed on drop if
/// it still runs (a failed test leaves no drydock behind).
#[derive(Debug)]
pub struct Spawned {
    child: Option<Child>,
    pub what: String,
}

impl Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child.as_ref().expect("a spawned drydock")
    }
}

impl DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a spawned drydock")
    }
}

impl Spawned {
    /// Send it `signal` (it must still be there to receive it).
    pub fn signal(&self, signal: i32) {
        drydock_gc::send_signal(self.id(), signal)
            .unwrap_or_else(|e| panic!("signal {signal} to {}: {e}", self.what));
    }

    /// Wait for its end, failing the test if it still runs after `limit`.
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(status) = self.try_wait().unwrap() {
                return status;
            }
            assert!(
                t.elapsed() < limit,
                "{} did not end within {limit:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for its end and collect what it wrote to piped stdout and stderr.
    pub fn output(mut self) -> Ran {
        let child = self.child.take().expect("a spawned drydock");
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{}: {e}", self.what));
        Ran {
            output,
            what: std::mem::take(&mut self.what),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Soft checks for long scenario tests, where one failed assertion must not hide the ones after
/// it. [`Checks::check`] runs a group of assertions as one named check: if any fails (panics),
/// the failure is recorded and the test goes on. A step that later steps depend on is asserted
/// outside a check (or its result taken from [`Checks::value`]), so the test still stops there.
/// When the test ends, every recorded failure is listed at once and the test fails; if it
/// stops early on a hard assertion, the soft failures before it are printed too.
#[derive(Debug, Default)]
pub struct Checks {
    failures: Vec<String>,
    run: usize,
}

impl Checks {
    pub fn new() -> Checks {
        Checks::default()
    }

    /// Run the assertions in `f` as the check `name`; returns whether they all held.
    pub fn check(&mut self, name: &str, f: impl FnOnce()) -> bool {
        self.value(name, f).is_some()
    }

    /// Like [`Checks::check`], for a check that produces what later checks use: `None` if it
    /// failed.
    pub fn value<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> Option<T> {
        self.run += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(v) => Some(v),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(a panic without a message)");
                self.failures.push(format!("{name}: {msg}"));
                None
            }
        }
    }

    fn report(&self) -> String {
        format!(
            "{} of {} checks failed:\n{}",
            self.failures.len(),
            self.run,
            self.failures
                .iter()
                .map(|f| format!("- {}", f.replace('\n', "\n  ")))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        if self.failures.is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("before the test stopped, {}", self.report());
        } else {
            panic!("{}", self.report());
        }
    }
}
