//! Shared helpers for drydock's store/track/gc CLI tests: real chroot Nix stores built with
//! `nix-build --store ROOT`, and running the real `drydock` binary against them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The options every fixture build gets: `/bin/sh` in the sandbox is busybox, and no binary
/// cache (nothing to fetch offline, and no retries to wait for).
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
    let out = drydock(root, state, &["track", "--", "sh", "-c", cmd]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// Run the drydock binary with `--store ROOT --state-dir STATE` and extra arguments.
pub fn drydock(root: &Path, state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_drydock"))
        .arg("--store")
        .arg(root)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run drydock")
}

/// Run drydock, require the exit code, and return stdout.
pub fn drydock_ok(root: &Path, state: &Path, args: &[&str], code: i32) -> String {
    let out = drydock(root, state, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "drydock {args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run drydock with `--json` and parse stdout.
pub fn drydock_json(root: &Path, state: &Path, args: &[&str], code: i32) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let s = drydock_ok(root, state, &a, code);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {s}"))
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

/// An ordinary user made for a test (removed on drop): the other local user of tests that play
/// one (`useradd` needs root).
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

    /// This user's uid.
    pub fn uid(&self) -> u32 {
        let out = Command::new("id")
            .args(["-u", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// `program` run as this user (fresh credentials from /etc/group, as a login would).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
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

    /// drydock run as this user with `--state-dir STATE` (and `HOME` there).
    pub fn drydock(&self, args: &[&str], state: &Path) -> Output {
        self.command(binary_for_all())
            .args(args)
            .arg("--state-dir")
            .arg(state)
            .env("HOME", state)
            .output()
            .expect("setpriv")
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// The test binary's directory may not be readable by other users; a copy of drydock where it
/// is.
pub fn binary_for_all() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("doctor-bin");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("drydock");
        // A copy per run: a running copy cannot be overwritten (ETXTBSY), so write beside it.
        let tmp = dir.join(format!("drydock.{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_drydock"), &tmp).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    })
    .clone()
}

/// Whether this process runs as root (tests that create users or cgroups need it).
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
