//! Evaluating and building a composition with Nix: `nix-instantiate --eval --strict --json`
//! prints the settings (systems reduced to their `drvPath`/`outPath`, so nothing is built and
//! no derivation is forced beyond its paths), which `compose` checks; then one `nix-build` of
//! every machine's system, in the same `--store`, recorded as a run by `drydock_gc::track`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drydock_gc::{Cancel, Deadline, RunsDb, StoreLayout, TrackReport};

use crate::compose::{ComposeError, Composition, SystemRef, parse_settings};

/// How long evaluating the settings may take (at most; the build's timeout, if shorter, too).
const EVAL_DEADLINE: Duration = Duration::from_secs(300);

/// The settings expression; `file` is the composition's absolute path. A system becomes
/// `{kind, drv, out}` (not `outPath`: JSON would print a set with one as that string) or `{kind = "path"; value}`; a function anywhere else becomes a
/// marker so that JSON output never fails on it (the checks then name it). The top-level
/// `testScript` (`drydock test`'s default script) is its string, or its type's marker.
pub const SETTINGS_EXPR: &str = r#"{ file }:
let
  raw = import (/. + file);
  c = if builtins.isFunction raw then raw { } else raw;
  sys = s:
    if builtins.isAttrs s && s ? outPath && s ? drvPath then
      { kind = "derivation"; drv = s.drvPath; out = s.outPath; }
    else if builtins.isString s || builtins.isPath s then
      { kind = "path"; value = toString s; }
    else if builtins.isAttrs s && s ? outPath then
      { kind = "path"; value = toString s.outPath; }
    else { kind = "other"; type = builtins.typeOf s; };
  val = v: if builtins.isFunction v then { __drydockType = "function"; } else v;
  machine = m:
    if builtins.isAttrs m then
      { attrs = builtins.mapAttrs (k: v: if k == "system" then sys v else val v) m; }
    else { type = builtins.typeOf m; };
in
if !(builtins.isAttrs c) then { error = "not-attrs"; type = builtins.typeOf c; }
else if !(c ? machines) then { error = "no-machines"; }
else if !(builtins.isAttrs c.machines) then { error = "machines-not-attrs"; type = builtins.typeOf c.machines; }
else {
  machines = builtins.mapAttrs (n: machine) c.machines;
  testScript =
    if !(c ? testScript) then null
    else if builtins.isString c.testScript then c.testScript
    else { __drydockType = builtins.typeOf c.testScript; };
}
"#;

/// The build expression: an attribute set of the named machines' systems.
pub const BUILD_EXPR: &str = r#"{ file, names }:
let
  raw = import (/. + file);
  c = if builtins.isFunction raw then raw { } else raw;
  wanted = builtins.filter (n: builtins.elem n (builtins.fromJSON names)) (builtins.attrNames c.machines);
in
builtins.listToAttrs (map (n: { name = n; value = c.machines.${n}.system; }) wanted)
"#;

/// Why a composition could not be evaluated or built.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: no such file", .0.display())]
    NoFile(PathBuf),
    #[error("cannot run nix-instantiate")]
    Spawn(#[source] std::io::Error),
    #[error("{}: Nix could not evaluate the composition:\n{message}", file.display())]
    Nix { file: PathBuf, message: String },
    #[error("{}: evaluating the composition took longer than {} s; it was stopped", file.display(), .after.as_secs())]
    Timeout { file: PathBuf, after: Duration },
    #[error("interrupted; the evaluation or build was stopped")]
    Interrupted,
    #[error("{}: nix-instantiate printed something that is not JSON", file.display())]
    Json {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Compose(ComposeError),
    #[error("preparing the store for the composition")]
    Store(#[source] drydock_gc::TrackError),
    #[error("building the composition's systems")]
    Track(#[source] Box<drydock_gc::GcError>),
    #[error(
        "nix-build of the composition's systems failed (exit code {0}); its messages are above"
    )]
    BuildFailed(i32),
    #[error(transparent)]
    NotPrivate(drydock_gc::PrivateError),
    #[error("cannot write the build expression {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl EvalError {
    /// A composition that does not evaluate, or evaluates to bad settings, is bad input; a
    /// failed build is a failure (exit 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NotPrivate(e) => e.is_bad_input(),
            _ => matches!(
                self,
                Self::NoFile(_) | Self::Nix { .. } | Self::Json { .. } | Self::Compose(_)
            ),
        }
    }
}

/// `--store ROOT` for Nix commands, when the store is a chroot store.
fn store_args(layout: &StoreLayout) -> Vec<String> {
    match &layout.root {
        Some(root) => vec!["--store".into(), root.display().to_string()],
        None => Vec::new(),
    }
}

/// Nix's message without its colour codes and the noise of the wrapper expression.
fn nix_message(stderr: &str) -> String {
    let mut out = String::new();
    let mut chars = stderr.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out.trim().to_string()
}

/// Evaluate the composition `file`'s settings and check them, within `deadline` (at most
/// [`EVAL_DEADLINE`]); `cancel` stops it at once. Nix runs in a process group of its own that
/// dies with drydock.
pub fn evaluate(
    layout: &StoreLayout,
    file: &Path,
    deadline: Duration,
    cancel: &Cancel,
) -> Result<Composition, EvalError> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    if !file.is_file() {
        return Err(EvalError::NoFile(file));
    }
    // Evaluation opens the store: a new chroot store is created first, once.
    drydock_gc::ensure_store(layout).map_err(EvalError::Store)?;
    let mut cmd = std::process::Command::new("nix-instantiate");
    cmd.args(["--eval", "--strict", "--json", "--expr", SETTINGS_EXPR])
        .arg("--argstr")
        .arg("file")
        .arg(&file)
        .args(store_args(layout));
    let within = deadline.min(EVAL_DEADLINE);
    let r = drydock_vm::run_captured_until(cmd, within, Some(cancel)).map_err(EvalError::Spawn)?;
    if r.cancelled {
        return Err(EvalError::Interrupted);
    }
    if r.timed_out {
        return Err(EvalError::Timeout {
            file,
            after: within,
        });
    }
    if r.code != Some(0) {
        return Err(EvalError::Nix {
            file,
            message: nix_message(&r.stderr),
        });
    }
    let v: serde_json::Value =
        serde_json::from_str(r.stdout.trim()).map_err(|source| EvalError::Json {
            file: file.clone(),
            source,
        })?;
    parse_settings(&file, &v).map_err(EvalError::Compose)
}

/// Where the build's outputs are rooted (`result`, `result-2`, ... beside the expression).
fn out_link(expr_file: &Path) -> PathBuf {
    expr_file.with_file_name("result")
}

/// Drop the GC roots a [`build`] left in `dir` (its `result*` links), once every system it built
/// is pinned by its machine's run, or is not needed any more.
pub fn release_build_roots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name == "result"
            || name
                .strip_prefix("result-")
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
        if ours && e.file_type().is_ok_and(|t| t.is_symlink()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The `nix-build` command line that builds the systems of `names` (pure; `track` runs it).
pub fn build_command(
    layout: &StoreLayout,
    file: &Path,
    expr_file: &Path,
    names: &[&str],
) -> Vec<String> {
    let mut cmd = vec![
        "nix-build".to_string(),
        expr_file.display().to_string(),
        "--out-link".into(),
        out_link(expr_file).display().to_string(),
        "--argstr".into(),
        "file".into(),
        file.display().to_string(),
        "--argstr".into(),
        "names".into(),
        serde_json::to_string(names).unwrap_or_else(|_| "[]".into()),
    ];
    cmd.extend(store_args(layout));
    cmd
}

/// How a composition's build is recorded and shown.
#[derive(Debug, Clone, Copy)]
pub struct BuildRun<'a> {
    /// The run's name (`up NAME`, `reload NAME`).
    pub name: &'a str,
    /// The command line recorded with it (what the user typed).
    pub command: &'a [String],
    /// Show the store paths `nix-build` prints (on stderr).
    pub show_outputs: bool,
}

/// Build the systems of the machines `names` of `c` in one `nix-build`, recorded as a run
/// (kind build) as `run` says, unless it built nothing new (then `TrackReport::run_id` is 0
/// and no run is left). The outputs stay rooted (links `result*` in `expr_dir`) until
/// [`release_build_roots`]: a GC between the build and the machines' pins cannot take them.
/// Machines whose system is a plain store path need no build; with none to build, nothing runs
/// and `None` is returned. The build dies with drydock, is stopped at `deadline` (exit 1) and
/// by `cancel` (Ctrl-C is forwarded to it; it is killed if it does not stop).
#[allow(clippy::too_many_arguments)]
pub fn build(
    layout: &StoreLayout,
    runs: &RunsDb,
    c: &Composition,
    names: &[&str],
    run: &BuildRun<'_>,
    expr_dir: &Path,
    deadline: Duration,
    cancel: &Cancel,
) -> Result<Option<TrackReport>, EvalError> {
    let to_build: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| {
            matches!(
                c.machines.get(*n).map(|m| &m.system),
                Some(SystemRef::Derivation { .. })
            )
        })
        .collect();
    if to_build.is_empty() {
        return Ok(None);
    }
    drydock_gc::private_dir(expr_dir).map_err(|e| match e {
        drydock_gc::PrivateError::Io { path, source } => EvalError::Write { path, source },
        e => EvalError::NotPrivate(e),
    })?;
    let expr_file = expr_dir.join("build.nix");
    // Atomically: a concurrent `up` of the same composition reads the old file or the new one,
    // never half of one (Nix would report a false syntax error).
    drydock_gc::write_atomic(&expr_file, BUILD_EXPR.as_bytes()).map_err(|source| {
        EvalError::Write {
            path: expr_file.clone(),
            source,
        }
    })?;
    let cmd = build_command(layout, &c.file, &expr_file, &to_build);
    // `track` takes the interruption it forwards: it gets a flag of its own, so that ours stays
    // set and `up` ends as interrupted.
    let forwarded = Arc::new(AtomicBool::new(cancel.is_set()));
    let f = forwarded.clone();
    let _forward = cancel.on_cancel(move || f.store(true, Ordering::SeqCst));
    // Nix's output paths go to stderr: `up`'s stdout is the consoles, or its JSON report.
    // Recorded as the command the user typed, and only if it built something new.
    let how = drydock_gc::TrackAs {
        name: Some(run.name),
        echo: match run.show_outputs {
            true => drydock_gc::Echo::Stderr,
            false => drydock_gc::Echo::Hidden,
        },
        recorded: (!run.command.is_empty()).then_some(run.command),
        forget_if_empty: true,
        deadline: Some(Deadline::after(deadline)),
    };
    let report = drydock_gc::track_as(layout, runs, &cmd, &forwarded, &how);
    if cancel.is_set() {
        return Err(EvalError::Interrupted);
    }
    let report = report.map_err(|e| EvalError::Track(Box::new(e)))?;
    if report.exit_code != 0 {
        return Err(EvalError::BuildFailed(report.exit_code));
    }
    Ok(Some(report))
}

/// After the build: every named machine's system must be a NixOS-shaped toplevel in the store
/// (kernel, initrd, init, kernel-params), else bad input naming `machines.NAME.system`.
pub fn check_systems(
    layout: &StoreLayout,
    c: &Composition,
    names: &[&str],
) -> Result<(), ComposeError> {
    for name in names {
        let Some(m) = c.machines.get(*name) else {
            continue;
        };
        let target = m.system.target();
        let result = drydock_vm::toplevel_path(layout, target)
            .and_then(|top| drydock_vm::resolve_system(layout, &top));
        if let Err(e) = result {
            return Err(ComposeError::BadValue {
                file: c.file.clone(),
                attr: format!("machines.{name}.system"),
                message: format!(
                    "{target} is not a NixOS-shaped system: {}",
                    drydock_vm::error_chain(&e)
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_messages_lose_their_colours() {
        assert_eq!(
            nix_message("\u{1b}[31;1merror:\u{1b}[0m syntax error\n"),
            "error: syntax error"
        );
    }

    #[test]
    fn the_build_command_names_the_store_and_the_machines() {
        let l = StoreLayout::chroot(PathBuf::from("/r"));
        let cmd = build_command(
            &l,
            Path::new("/p/drydock.nix"),
            Path::new("/s/build.nix"),
            &["a", "b"],
        );
        assert_eq!(
            cmd,
            [
                "nix-build",
                "/s/build.nix",
                "--out-link",
                "/s/result",
                "--argstr",
                "file",
                "/p/drydock.nix",
                "--argstr",
                "names",
                "[\"a\",\"b\"]",
                "--store",
                "/r"
            ]
        );
    }
}
