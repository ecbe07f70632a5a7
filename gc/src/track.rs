//! How `drydock track` attributes store paths to a command: the command passed through (its
//! stdout scanned for store paths), and the rule. Before: Nix's highest path id. After: the
//! paths registered since, kept only if they lie in the derivation closure of what the command
//! built (outputs printed on stdout or left as `result` links, their derivers, `inputDrvs`
//! walked with our parser), so that a concurrent, untracked build's paths are not claimed.
//! Also the one-time creation of a new chroot store ([`ensure_store`]). The operation that
//! records the run in the runs database is `track_run`, above this module.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::child::ExitWatch;
use crate::deadline::Deadline;
use crate::drv::{Derivation, parse_derivation};
use crate::exitclass::{Classify, ExitClass};
use crate::nixdb::{NixDb, PathInfo};
use crate::store_path::{StoreLayout, StorePath};

/// Errors of `track` itself (the command's own failure is its exit code, not an error).
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// Nothing to run.
    #[error("no command given to track")]
    NoCommand,
    /// The command could not be started.
    #[error("cannot run '{program}'")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// Interrupted (Ctrl-C, SIGTERM) after the command had exited.
    #[error(
        "interrupted; run {run_id} ended with the command's exit code {exit_code}, its paths not attributed"
    )]
    Interrupted { run_id: i64, exit_code: i32 },
    /// The command ran past its deadline and was stopped (SIGINT, then SIGKILL).
    #[error("'{program}' did not finish within {} s and was stopped; run {run_id} ended with code {exit_code}", after.as_secs())]
    Late {
        program: String,
        after: Duration,
        run_id: i64,
        exit_code: i32,
    },
    /// Waiting for the command or copying its output failed.
    #[error("while running '{program}'")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A chroot store without a database could not be created.
    #[error("cannot create the Nix store at {}", root.display())]
    InitStore {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `nix-store --init` failed on a chroot store without a database.
    #[error("cannot create the Nix store at {}: nix-store --init said: {message}", root.display())]
    InitFailed { root: PathBuf, message: String },
}

impl Classify for TrackError {
    /// A missing or unstartable command is bad input; Ctrl-C after the command ended is an
    /// interruption; the rest (a command stopped at its deadline included) are failures.
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::NoCommand | Self::Spawn { .. } => ExitClass::BadInput,
            Self::Interrupted { .. } => ExitClass::Interrupted,
            Self::Late { .. }
            | Self::Wait { .. }
            | Self::InitStore { .. }
            | Self::InitFailed { .. } => ExitClass::Failed,
        }
    }
}

/// How often the wait for a tracked command looks at the caller's cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(10);
/// How long a command told to stop (SIGINT: Ctrl-C forwarded, or its deadline) has before it
/// is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// At most this many distinct store paths named on a tracked command's stdout are kept (each
/// is a starting point of the attribution); further ones are dropped with one warning. A build
/// prints one path per output it was asked for, far fewer than this.
const MAX_OUTPUT_PATHS: usize = 65_536;

/// Lines of a tracked command's stdout longer than this many bytes are passed through but not
/// scanned for store paths (with one warning), so that a line without end cannot grow
/// drydock's memory. A store path's line is short; `nix build --json` naming thousands of
/// outputs on one line fits.
const MAX_SCANNED_LINE: usize = 1 << 20;

/// A tracked command's stdout, passed through line by line and scanned for store paths, in
/// bounded memory: one line of at most [`MAX_SCANNED_LINE`] bytes and at most
/// [`MAX_OUTPUT_PATHS`] distinct paths are held, whatever the command prints.
#[derive(Debug)]
struct OutputScan {
    store_dir: String,
    /// The current line, while it is within [`MAX_SCANNED_LINE`] (its capacity never grows
    /// beyond that).
    line: Vec<u8>,
    /// Every path kept so far.
    seen: HashSet<StorePath>,
    /// Paths kept since [`OutputScan::take_new`] was last called.
    new: Vec<StorePath>,
    /// Lines passed through but not scanned, for being too long.
    long_lines: usize,
    /// Distinct paths dropped beyond [`MAX_OUTPUT_PATHS`].
    dropped_paths: usize,
}

/// Pass `bytes` through to `echo`. A closed stdout on our side must not kill the command's run,
/// so errors are ignored.
fn echo_bytes(echo: &mut dyn Write, bytes: &[u8]) {
    let _ = echo.write_all(bytes).and_then(|_| echo.flush());
}

impl OutputScan {
    fn new(store_dir: &str) -> Self {
        Self {
            store_dir: store_dir.to_owned(),
            line: Vec::with_capacity(MAX_SCANNED_LINE),
            seen: HashSet::new(),
            new: Vec::new(),
            long_lines: 0,
            dropped_paths: 0,
        }
    }

    /// Read one line of `input` (up to and including its `\n`, or to the end of the input),
    /// pass it through to `echo` and keep the store paths it names. A line within
    /// [`MAX_SCANNED_LINE`] is written (and flushed) whole once complete, as before scanning
    /// was bounded; a longer one is written piece by piece as it is read. Returns false at the
    /// end of the input.
    fn next_line(
        &mut self,
        input: &mut impl BufRead,
        echo: &mut dyn Write,
    ) -> std::io::Result<bool> {
        self.line.clear();
        let (mut read_any, mut too_long) = (false, false);
        loop {
            let buf = match input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                break;
            }
            read_any = true;
            let (chunk, ends) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            if !too_long && self.line.len() + chunk.len() <= MAX_SCANNED_LINE {
                self.line.extend_from_slice(chunk);
            } else {
                if !too_long {
                    too_long = true;
                    echo_bytes(echo, &self.line);
                    self.line.clear();
                    if self.long_lines == 0 {
                        tracing::warn!(
                            "the command printed a line longer than {MAX_SCANNED_LINE} bytes: it \
                             is passed through but not scanned for store paths (said once)"
                        );
                    }
                    self.long_lines += 1;
                }
                echo_bytes(echo, chunk);
            }
            let n = chunk.len();
            input.consume(n);
            if ends {
                break;
            }
        }
        if !too_long && read_any {
            echo_bytes(echo, &self.line);
            self.keep_paths();
        }
        Ok(read_any)
    }

    /// Keep the store paths named on the current line, new ones only, up to the cap.
    fn keep_paths(&mut self) {
        for p in store_paths_in_output(&self.store_dir, &self.line) {
            if self.seen.contains(&p) {
                continue;
            }
            if self.seen.len() >= MAX_OUTPUT_PATHS {
                if self.dropped_paths == 0 {
                    tracing::warn!(
                        "the command named more than {MAX_OUTPUT_PATHS} store paths on its \
                         output: only the first ones are used to attribute its paths (said once)"
                    );
                }
                self.dropped_paths += 1;
                continue;
            }
            self.seen.insert(p.clone());
            self.new.push(p);
        }
    }

    /// The paths kept since the last call.
    fn take_new(&mut self) -> Vec<StorePath> {
        std::mem::take(&mut self.new)
    }
}

/// Set while someone waits for what the reader of a tracked command's stdout finds; cleared
/// when the [`Passthrough`] is dropped, and the reader then stops at the next line.
#[derive(Debug)]
struct Listening(Arc<AtomicBool>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The tracked command, started with stdin and stderr inherited and stdout passed through (and
/// scanned for store paths).
pub(crate) struct Passthrough {
    program: String,
    child: std::process::Child,
    /// The distinct store paths its stdout named, each sent once, at most
    /// [`MAX_OUTPUT_PATHS`] in all (so the channel is bounded too).
    paths: std::sync::mpsc::Receiver<StorePath>,
    _listening: Listening,
}

impl Passthrough {
    /// Start `cmd`, scanning its stdout for paths in `store_dir` (the logical store
    /// directory). A command that cannot be started is bad input, and nothing is recorded. It
    /// dies with drydock (SIGKILL included).
    pub(crate) fn spawn(cmd: &[String], echo: Echo, store_dir: &str) -> Result<Self, TrackError> {
        let program = cmd.first().ok_or(TrackError::NoCommand)?.clone();
        let mut command = Command::new(&program);
        command.args(&cmd[1..]).stdout(Stdio::piped());
        crate::sys::die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|source| TrackError::Spawn {
            program: program.clone(),
            source,
        })?;
        // Copy stdout in a thread, so that a background process that inherited the pipe cannot
        // keep us waiting once the command itself has exited.
        let (tx, paths) = std::sync::mpsc::channel::<StorePath>();
        let listening = Arc::new(AtomicBool::new(true));
        if let Some(out) = child.stdout.take() {
            let listening = Arc::clone(&listening);
            let mut scan = OutputScan::new(store_dir);
            std::thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut stdout: Box<dyn Write> = match echo {
                    Echo::Stdout => Box::new(std::io::stdout()),
                    Echo::Stderr => Box::new(std::io::stderr()),
                    Echo::Hidden => Box::new(std::io::sink()),
                };
                while listening.load(Ordering::SeqCst) {
                    match scan.next_line(&mut r, &mut stdout) {
                        Ok(true) => {}
                        Ok(false) | Err(_) => break,
                    }
                    if scan.take_new().into_iter().any(|p| tx.send(p).is_err()) {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            program,
            child,
            paths,
            _listening: Listening(listening),
        })
    }

    /// Stop the command (kill and reap it), when its run cannot be recorded.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the command. `cancel` (set by the caller's Ctrl-C/SIGTERM handler) is forwarded
    /// to it as SIGINT, once; the flag is then consumed, so that a later one interrupts what
    /// follows. At `deadline` it is sent SIGINT too. A command that has not exited
    /// [`STOP_GRACE`] after its SIGINT (or at a second interruption) is killed. Returns the exit
    /// code (128 + signal if it was killed), the distinct store paths named on its stdout,
    /// sorted, and whether the deadline passed.
    pub(crate) fn wait(
        mut self,
        cancel: &AtomicBool,
        deadline: Option<Deadline>,
    ) -> Result<(i32, Vec<StorePath>, bool), TrackError> {
        let wait_err = |source| TrackError::Wait {
            program: self.program.clone(),
            source,
        };
        let pid = self.child.id();
        let watch = ExitWatch::start(&self.child);
        // The command's exit ends the wait at once. The cancel flag, set by the caller's signal
        // handler, cannot be waited on: it is looked at every CANCEL_CHECK until it has been
        // forwarded, and then the wait is for the exit, within STOP_GRACE.
        let mut exited = false;
        let mut late = false;
        while !exited {
            let step = Deadline::after(CANCEL_CHECK);
            exited = watch.wait_until(deadline.map_or(step, |d| d.min(step)));
            if exited {
                break;
            }
            late = deadline.is_some_and(Deadline::expired);
            if late || cancel.swap(false, Ordering::SeqCst) {
                let _ = crate::sys::send_signal(pid, libc::SIGINT);
                let grace = Deadline::after(STOP_GRACE);
                // A second interruption during the grace kills at once.
                while !watch.wait_until(Deadline::after(CANCEL_CHECK).min(grace)) {
                    if grace.expired() || cancel.load(Ordering::SeqCst) {
                        let _ = self.child.kill();
                        watch.wait();
                        break;
                    }
                }
                exited = true;
            }
        }
        let status = self.child.wait().map_err(wait_err)?;
        // What the reader has still to send, until it reaches the end of the output, for at
        // most 2 s (a background process may hold the pipe open for ever). Again the cancel
        // flag is looked at between waits of at most 100 ms.
        let mut found = Vec::new();
        let deadline = Deadline::after(Duration::from_secs(2));
        loop {
            if cancel.load(Ordering::SeqCst) {
                break;
            }
            let slice = Deadline::after(Duration::from_millis(100)).min(deadline);
            match self.paths.recv_timeout(slice.remaining()) {
                Ok(p) => found.push(p),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !deadline.expired() => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tracing::debug!("stdout still open after the command exited; not waiting");
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        found.sort();
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1);
        Ok((code, found, late))
    }

    pub(crate) fn program(&self) -> &str {
        &self.program
    }
}

/// Store paths named in command output (one per whitespace-separated token).
pub fn store_paths_in_output(store_dir: &str, text: &[u8]) -> Vec<StorePath> {
    let text = String::from_utf8_lossy(text);
    let mut v: Vec<StorePath> = text
        .split(|c: char| c.is_whitespace() || c == '\'' || c == '"')
        .filter_map(|t| StorePath::parse_prefix(store_dir, t).ok())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Result links in `dir` (`result`, `result-*`) and out-links named in the command line
/// (`-o X`, `--out-link X`), resolved to store paths.
pub fn result_links(store_dir: &str, dir: &Path, cmd: &[String]) -> Vec<StorePath> {
    let mut links: Vec<PathBuf> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == "result" || n.starts_with("result-") {
                links.push(e.path());
            }
        }
    }
    for w in cmd.windows(2) {
        if w[0] == "-o" || w[0] == "--out-link" {
            let base = dir.join(&w[1]);
            links.push(base.clone());
            // Multi-output builds add -NAME suffixes.
            if let (Some(parent), Some(name)) = (base.parent(), base.file_name())
                && let Ok(rd) = std::fs::read_dir(parent)
            {
                let prefix = format!("{}-", name.to_string_lossy());
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        links.push(e.path());
                    }
                }
            }
        }
    }
    let mut out: Vec<StorePath> = links
        .iter()
        .filter_map(|l| std::fs::read_link(l).ok())
        .filter_map(|t| StorePath::parse_prefix(store_dir, &t.to_string_lossy()).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// How `attribute` looks at the store (so the rule can be tested as data).
pub trait StoreView {
    /// Derivers of an output: the recorded deriver and any `DerivationOutputs` entries.
    fn derivers(&self, p: &StorePath) -> Vec<StorePath>;
    /// A parsed `.drv`, if readable.
    fn derivation(&self, p: &StorePath) -> Option<Derivation>;
    /// Direct references of a valid path.
    fn references(&self, p: &StorePath) -> Vec<StorePath>;
}

/// The rule: of the newly registered paths, claim those in the derivation closure of the
/// outputs (derivers, their input derivations recursively, those derivations' outputs and
/// input sources) and in the reference closure of the outputs among the new paths.
pub fn attribute(
    store_dir: &str,
    new_paths: &[PathInfo],
    outputs: &[StorePath],
    view: &dyn StoreView,
) -> Vec<StorePath> {
    let new: HashSet<&StorePath> = new_paths.iter().map(|p| &p.path).collect();
    let mut closure: HashSet<StorePath> = HashSet::new();
    let mut drv_stack: Vec<StorePath> = Vec::new();
    let mut seen_drv: HashSet<StorePath> = HashSet::new();
    let mut push_drv = |d: StorePath, stack: &mut Vec<StorePath>| {
        if seen_drv.insert(d.clone()) {
            stack.push(d);
        }
    };
    for o in outputs {
        closure.insert(o.clone());
        if o.is_derivation() {
            push_drv(o.clone(), &mut drv_stack);
        }
        for d in view.derivers(o) {
            push_drv(d, &mut drv_stack);
        }
    }
    while let Some(d) = drv_stack.pop() {
        closure.insert(d.clone());
        let Some(drv) = view.derivation(&d) else {
            continue;
        };
        for o in drv.outputs.values() {
            if let Ok(p) = StorePath::parse(store_dir, &o.path) {
                closure.insert(p);
            }
        }
        for s in &drv.input_srcs {
            if let Ok(p) = StorePath::parse(store_dir, s) {
                closure.insert(p);
            }
        }
        for i in drv.input_drvs.keys() {
            if let Ok(p) = StorePath::parse(store_dir, i) {
                push_drv(p, &mut drv_stack);
            }
        }
    }
    // Runtime closure of the outputs, through new paths only (an older path cannot refer to
    // a newer one).
    let mut stack: Vec<StorePath> = outputs
        .iter()
        .filter(|o| new.contains(o))
        .cloned()
        .collect();
    let mut seen: HashSet<StorePath> = stack.iter().cloned().collect();
    while let Some(p) = stack.pop() {
        closure.insert(p.clone());
        for r in view.references(&p) {
            if new.contains(&r) && seen.insert(r.clone()) {
                stack.push(r);
            }
        }
    }
    let mut claimed: Vec<StorePath> = new_paths
        .iter()
        .filter(|p| closure.contains(&p.path))
        .map(|p| p.path.clone())
        .collect();
    claimed.sort();
    claimed
}

/// [`StoreView`] over Nix's database, reading `.drv` files from the store (each once).
pub(crate) struct DbView<'a> {
    db: &'a NixDb,
    layout: &'a StoreLayout,
    cache: std::cell::RefCell<HashMap<StorePath, Option<Derivation>>>,
}

impl<'a> DbView<'a> {
    /// A view of the store `layout` through its open database `db`.
    pub(crate) fn new(db: &'a NixDb, layout: &'a StoreLayout) -> Self {
        Self {
            db,
            layout,
            cache: Default::default(),
        }
    }
}

impl StoreView for DbView<'_> {
    fn derivers(&self, p: &StorePath) -> Vec<StorePath> {
        let mut v = self.db.derivers_of(p).unwrap_or_default();
        if let Ok(Some(info)) = self.db.path_info(p)
            && let Some(d) = info.deriver
        {
            v.push(d);
        }
        v
    }

    fn derivation(&self, p: &StorePath) -> Option<Derivation> {
        self.cache
            .borrow_mut()
            .entry(p.clone())
            .or_insert_with(|| {
                // A .drv in the store that is a FIFO, a link to /dev/zero or huge is no
                // derivation Nix wrote: skip it, named, without blocking or reading it all.
                let bytes = crate::fsread::read_regular(
                    &self.layout.physical(p),
                    crate::fsread::Links::Refuse,
                    crate::fsread::MAX_DRV_BYTES,
                )
                .map_err(|e| tracing::warn!("{p}: {e}"))
                .ok()?;
                parse_derivation(&bytes)
                    .map_err(|e| tracing::warn!("cannot parse {p}: {e}"))
                    .ok()
            })
            .clone()
    }

    fn references(&self, p: &StorePath) -> Vec<StorePath> {
        self.db.references(p).unwrap_or_default()
    }
}

/// How long the first user of a new chroot store waits for another one creating it.
const INIT_DEADLINE: Duration = Duration::from_secs(60);

/// Create the chroot store `layout.root` if it has no database yet, once. Concurrent first
/// users of a new store (two `up`s, parallel builds) would otherwise race Nix's own creation
/// of its database, and the loser fails with `SQLite database '…' is busy` or `'…/schema' is
/// corrupt`. The root directory is `flock`ed while `nix-store --init` makes the database; a
/// store that has one, and the system store, are left alone.
pub fn ensure_store(layout: &StoreLayout) -> Result<(), TrackError> {
    let Some(root) = &layout.root else {
        return Ok(());
    };
    if layout.has_database() {
        return Ok(());
    }
    let init = |source| TrackError::InitStore {
        root: root.clone(),
        source,
    };
    std::fs::create_dir_all(root).map_err(init)?;
    let dir = std::fs::File::open(root).map_err(init)?;
    if !crate::sys::lock_exclusive_within(&dir, INIT_DEADLINE) {
        return Err(init(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("another process held the store's lock for {INIT_DEADLINE:?}"),
        )));
    }
    if layout.has_database() {
        return Ok(());
    }
    tracing::info!("creating the Nix store at {}", root.display());
    let mut cmd = Command::new("nix-store");
    cmd.args(layout.nix_args()).arg("--init");
    match crate::nixcmd::run_nix(cmd, Deadline::after(INIT_DEADLINE)) {
        Err(source) => Err(TrackError::Spawn {
            program: "nix-store".into(),
            source,
        }),
        Ok(None) => Err(TrackError::InitFailed {
            root: root.clone(),
            message: format!("no answer within {INIT_DEADLINE:?}"),
        }),
        Ok(Some((status, _))) if status.success() => Ok(()),
        Ok(Some((_, stderr))) => Err(TrackError::InitFailed {
            root: root.clone(),
            message: stderr.trim().to_string(),
        }),
    }
}

/// Where a tracked command's stdout is passed through to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    Stdout,
    /// For a caller whose own stdout is a report (`up --json`).
    Stderr,
    /// Read (the outputs are still found) but not shown: `up`'s build, unless `-v`.
    Hidden,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drv::DrvOutput;

    fn sp(i: usize, suffix: &str) -> StorePath {
        StorePath::from_base_name(&format!("{:0>32}-p{i}{suffix}", i)).unwrap()
    }

    fn full(p: &StorePath) -> String {
        format!("/nix/store/{p}")
    }

    struct FakeStore {
        drvs: HashMap<StorePath, Derivation>,
        derivers: HashMap<StorePath, StorePath>,
        refs: HashMap<StorePath, Vec<StorePath>>,
    }

    impl StoreView for FakeStore {
        fn derivers(&self, p: &StorePath) -> Vec<StorePath> {
            self.derivers.get(p).cloned().into_iter().collect()
        }
        fn derivation(&self, p: &StorePath) -> Option<Derivation> {
            self.drvs.get(p).cloned()
        }
        fn references(&self, p: &StorePath) -> Vec<StorePath> {
            self.refs.get(p).cloned().unwrap_or_default()
        }
    }

    fn drv(out: &StorePath, inputs: &[&StorePath], srcs: &[&StorePath]) -> Derivation {
        let mut d = Derivation::default();
        d.outputs.insert(
            "out".into(),
            DrvOutput {
                path: full(out),
                hash_algo: String::new(),
                hash: String::new(),
            },
        );
        for i in inputs {
            d.input_drvs.insert(full(i), vec!["out".into()]);
        }
        d.input_srcs = srcs.iter().map(|s| full(s)).collect();
        d
    }

    fn info(p: &StorePath) -> PathInfo {
        PathInfo {
            id: 0,
            path: p.clone(),
            registration_time: 0,
            deriver: None,
            nar_size: 0,
        }
    }

    #[test]
    fn claims_the_derivation_closure_only() {
        // Ours: top.drv -> dep.drv (+ src); top, dep outputs. Theirs: other.drv + output,
        // registered meanwhile by someone else.
        let (top_d, top_o) = (sp(1, ".drv"), sp(2, ""));
        let (dep_d, dep_o) = (sp(3, ".drv"), sp(4, ""));
        let src = sp(5, "-src");
        let (oth_d, oth_o) = (sp(6, ".drv"), sp(7, ""));
        let rt = sp(8, "-runtime-only");
        let store = FakeStore {
            drvs: [
                (top_d.clone(), drv(&top_o, &[&dep_d], &[])),
                (dep_d.clone(), drv(&dep_o, &[], &[&src])),
                (oth_d.clone(), drv(&oth_o, &[], &[])),
            ]
            .into(),
            derivers: [
                (top_o.clone(), top_d.clone()),
                (dep_o.clone(), dep_d.clone()),
            ]
            .into(),
            refs: [(top_o.clone(), vec![rt.clone()])].into(),
        };
        let new: Vec<PathInfo> = [&top_d, &top_o, &dep_d, &dep_o, &src, &oth_d, &oth_o, &rt]
            .iter()
            .map(|p| info(p))
            .collect();
        let claimed = attribute("/nix/store", &new, std::slice::from_ref(&top_o), &store);
        let mut want = vec![top_d, top_o, dep_d, dep_o, src, rt];
        want.sort();
        assert_eq!(claimed, want);
        // Nothing built, nothing claimed.
        assert!(attribute("/nix/store", &new, &[], &store).is_empty());
    }

    #[test]
    fn output_scanning() {
        let t = format!(
            "building...\n{}\n'{}/bin/x'\n",
            full(&sp(1, "")),
            full(&sp(2, ""))
        );
        assert_eq!(
            store_paths_in_output("/nix/store", t.as_bytes()),
            vec![sp(1, ""), sp(2, "")]
        );
    }

    #[test]
    fn result_links_and_out_links() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(full(&sp(1, "")), dir.path().join("result")).unwrap();
        std::os::unix::fs::symlink(full(&sp(2, "")), dir.path().join("result-dev")).unwrap();
        std::os::unix::fs::symlink(full(&sp(3, "")), dir.path().join("mine")).unwrap();
        std::os::unix::fs::symlink(full(&sp(4, "")), dir.path().join("mine-doc")).unwrap();
        std::os::unix::fs::symlink("/tmp", dir.path().join("result-x")).unwrap();
        let got = result_links(
            "/nix/store",
            dir.path(),
            &["nix-build".into(), "-o".into(), "mine".into()],
        );
        assert_eq!(got, vec![sp(1, ""), sp(2, ""), sp(3, ""), sp(4, "")]);
    }

    #[test]
    fn a_store_root_that_cannot_be_made_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = ensure_store(&StoreLayout::chroot(&file)).unwrap_err();
        assert!(matches!(e, TrackError::InitStore { .. }), "{e:?}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        // The system store is never created by drydock.
        let system = StoreLayout::system(dir.path().join("nostore"), dir.path().join("nostate"));
        ensure_store(&system).unwrap();
        assert!(!dir.path().join("nostate").exists());
    }
    use std::io::Read as _;

    /// `left` bytes of build log without a store path, generated as read.
    struct Log {
        left: usize,
        at: usize,
    }

    impl std::io::Read for Log {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            const LINE: &[u8] = b"building: compiling module 42 of a long build, no path here\n";
            let n = buf.len().min(self.left);
            for b in &mut buf[..n] {
                *b = LINE[self.at % LINE.len()];
                self.at += 1;
            }
            self.left -= n;
            Ok(n)
        }
    }

    /// Counts what is passed through.
    #[derive(Default)]
    struct Counted(usize);

    impl Write for Counted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn scan_all(
        scan: &mut OutputScan,
        input: impl std::io::Read,
        echo: &mut dyn Write,
    ) -> Vec<StorePath> {
        let mut input = BufReader::new(input);
        let mut kept = Vec::new();
        while scan.next_line(&mut input, echo).unwrap() {
            kept.extend(scan.take_new());
        }
        kept
    }

    #[test]
    fn huge_output_without_paths_is_passed_through_in_bounded_memory() {
        let log = 16 << 20;
        let long_line = 3 * MAX_SCANNED_LINE;
        let last = format!("\n{}\n", full(&sp(1, "")));
        let input = Log { left: log, at: 0 }
            .chain(std::io::repeat(b'x').take(long_line as u64))
            .chain(last.as_bytes());
        let mut scan = OutputScan::new("/nix/store");
        let mut echo = Counted::default();
        let kept = scan_all(&mut scan, input, &mut echo);
        // Everything was passed through; of it, only the one path is kept.
        assert_eq!(echo.0, log + long_line + last.len());
        assert_eq!(kept, vec![sp(1, "")]);
        assert_eq!(scan.seen.len(), 1);
        // The line without end went over the cap: passed through, not held.
        assert_eq!(scan.long_lines, 1);
        assert!(scan.line.capacity() <= MAX_SCANNED_LINE);
    }

    #[test]
    fn paths_beyond_the_cap_are_dropped() {
        let n = MAX_OUTPUT_PATHS + 100;
        let text: String = (0..n)
            .map(|i| format!("{} {}\n", full(&sp(i, "")), full(&sp(i, ""))))
            .collect();
        let mut scan = OutputScan::new("/nix/store");
        let kept = scan_all(&mut scan, text.as_bytes(), &mut std::io::sink());
        assert_eq!(kept.len(), MAX_OUTPUT_PATHS);
        assert_eq!(scan.seen.len(), MAX_OUTPUT_PATHS);
        assert_eq!(scan.dropped_paths, 100);
    }

    #[test]
    fn store_paths_are_found_and_output_passed_through_as_printed() {
        let (a, b, c) = (sp(1, ""), sp(2, ".drv"), sp(3, ""));
        // A line of exactly the cap is still scanned; the last line has no newline.
        let pad = "y".repeat(MAX_SCANNED_LINE - full(&c).len() - 2);
        let text = format!(
            "building...\n{}\n'{}/bin/x' and {}\nagain {}\n{pad} {}\nno newline {}",
            full(&a),
            full(&b),
            full(&a),
            full(&b),
            full(&c),
            full(&sp(4, ""))
        );
        let mut scan = OutputScan::new("/nix/store");
        let mut echo = Vec::new();
        let kept = scan_all(&mut scan, text.as_bytes(), &mut echo);
        assert_eq!(echo, text.as_bytes());
        assert_eq!(kept, vec![a, b, c, sp(4, "")]);
        assert_eq!(scan.long_lines, 0);
    }
}
