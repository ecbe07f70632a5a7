//! A VM's console, from QEMU to the user's terminal.
//!
//! QEMU's serial port is a client-mode socket chardev on `console.sock`, which the VM's owner
//! listens on. One thread per VM in the owner (the [`ConsolePump`]) reads it: it writes what
//! the guest printed to `console.log` as it arrives, bounded ([`BoundedLog`]: the file is
//! rotated to `console.log.1` at a quarter of the limit, so a machine's console log and its
//! cluster's timed log stay within the limit together), and hands each line once to the owner
//! (a cluster stamps it into `console.timed` and echoes it). Other processes follow the files:
//! [`ConsoleTail`] reads a log as it grows (across rotations and restarts), and [`follow`] and
//! [`LogWatch`] block on inotify until it grows, instead of reading it every few milliseconds.
//!
//! What a guest prints is never shown raw: [`escape_control`] is the one function that turns
//! control characters and escape sequences into visible text before a line reaches a terminal.

use std::borrow::Cow;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use drydock_gc::{Cancel, Deadline};
use inotify::{Inotify, WatchDescriptor, WatchMask};

use crate::wait::{ProcessWatch, WakeFd, Waker, wait_readable, wake_pair};

/// How many bytes of console logs a VM keeps on disk by default (its `console.log` with the
/// rotated `.1`, and a cluster machine's `console.timed` with its `.1`).
pub const DEFAULT_LOG_LIMIT: u64 = 32 << 20;
/// The smallest limit accepted.
pub const MIN_LOG_LIMIT: u64 = 64 << 10;
/// The longest line handed on whole; a longer one is handed on in pieces of this size.
pub const MAX_LINE: usize = 8 << 10;
/// How much the pump reads at once (so a write to a log is never more than this).
const READ_CHUNK: usize = 8 << 10;
/// How long a [`follow`] without inotify (none left for this user) waits between two reads of
/// the log: the back-off that bounds how late it sees a line.
const NO_INOTIFY_BACKOFF: Duration = Duration::from_millis(100);

/// The size at which each log file of a VM whose logs are limited to `limit` bytes is rotated:
/// a quarter, so that each log (current and rotated file) stays within half the limit.
pub fn rotate_at(limit: u64) -> u64 {
    (limit.max(MIN_LOG_LIMIT) / 4).max(2 * READ_CHUNK as u64)
}

/// Where a log is rotated to: `PATH.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut p: OsString = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// `line`, as a terminal may show it: control characters (C0 but tab, DEL, C1) and the
/// characters that reorder text (bidirectional overrides and isolates) are written as escapes
/// (`\e`, `\r`, `\x07`, `\u{9b}`, `\u{202e}` ...), so that escape sequences a guest prints
/// (OSC 52 clipboard writes, title changes, clearing the screen, moving the cursor) are seen,
/// not obeyed. Everything else is left as it is.
pub fn escape_control(line: &str) -> Cow<'_, str> {
    fn shown(c: char) -> bool {
        let control = c.is_control() && c != '\t';
        let reorders = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        !control && !reorders
    }
    if line.chars().all(shown) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        match c {
            c if shown(c) => out.push(c),
            '\u{1b}' => out.push_str("\\e"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\u{8}' => out.push_str("\\b"),
            '\u{7}' => out.push_str("\\a"),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// A log file of bounded size: once the next write would take it past its rotation size, it
/// is renamed to `PATH.1` (replacing the one before) and a new one is started. So it never holds
/// more than twice the rotation size on disk, and a reader that keeps the old file open reads
/// its end before moving to the new one (see [`ConsoleTail`]). Its files are 0600 and opened
/// with `O_NOFOLLOW`: a link planted at its path is an error, never followed
/// (`drydock_gc::create_nofollow`, `open_append_nofollow`).
#[derive(Debug)]
pub struct BoundedLog {
    path: PathBuf,
    file: File,
    len: u64,
    rotate_at: u64,
}

impl BoundedLog {
    /// A new, empty log at `path` (an old one and its `.1` are removed) rotated at `rotate_at`.
    pub fn create(path: &Path, rotate_at: u64) -> std::io::Result<Self> {
        match std::fs::remove_file(rotated(path)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = drydock_gc::create_nofollow(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: 0,
            rotate_at,
        })
    }

    /// The log at `path`, continued (made if missing): a log that outlives one writer.
    pub fn append(path: &Path, rotate_at: u64) -> std::io::Result<Self> {
        let file = drydock_gc::open_append_nofollow(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            rotate_at,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `bytes`, rotating first if they would not fit.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.len > 0 && self.len + bytes.len() as u64 > self.rotate_at {
            std::fs::rename(&self.path, rotated(&self.path))?;
            self.file = drydock_gc::create_nofollow(&self.path)?;
            self.len = 0;
        }
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// Reads a growing console log line by line. It keeps the file it reads open: a log that was
/// rotated ([`BoundedLog`]) or made anew (a machine restarted by a hot reload keeps the old
/// one aside as `console.log.prev`) is read to its end first, then the new file from its start.
#[derive(Debug)]
pub struct ConsoleTail {
    path: PathBuf,
    file: Option<File>,
    id: Option<(u64, u64)>,
    offset: u64,
    partial: Vec<u8>,
}

fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

impl ConsoleTail {
    /// The log at `path`, from the start of the file there now.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            id: None,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The log at `path` from its oldest line still on disk: its rotated `.1`, then the file.
    pub fn with_rotated(path: PathBuf) -> Self {
        let mut t = Self::new(path);
        if let Ok(f) = File::open(rotated(&t.path)) {
            t.id = f.metadata().ok().map(|m| identity(&m));
            t.file = Some(f);
        }
        t
    }

    /// The log at `path`, from its end now (only what is written from now on).
    pub fn at_end(path: PathBuf) -> Self {
        let mut t = Self::new(path);
        if let Ok(f) = File::open(&t.path) {
            if let Ok(m) = f.metadata() {
                t.id = Some(identity(&m));
                t.offset = m.len();
            }
            t.file = Some(f);
        }
        t
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read what the open file has past our offset into `partial`.
    fn drain(&mut self) {
        let Some(f) = self.file.as_mut() else {
            return;
        };
        if let Ok(m) = f.metadata() {
            if m.len() < self.offset {
                // Truncated in place: start again.
                self.offset = 0;
                self.partial.clear();
            }
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.offset += n as u64;
        }
        self.partial.extend_from_slice(&buf);
    }

    /// Complete lines written since the last call (without `\r`/`\n`).
    pub fn lines(&mut self) -> Vec<String> {
        self.drain();
        // Whatever is at the path now: if it is not the file we read, that one is finished
        // (rotated or replaced) and read to its end above; continue with this one.
        if let Ok(f) = File::open(&self.path) {
            let id = f.metadata().ok().map(|m| identity(&m));
            if self.file.is_none() || id != self.id {
                self.file = Some(f);
                self.id = id;
                self.offset = 0;
                self.drain();
            }
        }
        let mut out = Vec::new();
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line);
            out.push(text.trim_end_matches(['\n', '\r']).to_string());
        }
        out
    }

    /// The unfinished last line, if any (for a final flush).
    pub fn rest(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_string();
        self.partial.clear();
        Some(text)
    }
}

/// One log [`LogWatch`] follows: its name in its directory, and the watches on both.
#[derive(Debug)]
struct Watched {
    path: PathBuf,
    name: OsString,
    dir: Option<WatchDescriptor>,
    file: Option<WatchDescriptor>,
}

/// What woke a [`LogWatch::wait`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Woke {
    /// A followed log was written, made, rotated or removed.
    pub logs: bool,
    /// Which of the extra descriptors are readable.
    pub also: Vec<bool>,
}

/// A blocking wait for logs to change (inotify on each file and on its directory, for files
/// made, rotated or replaced), together with other descriptors (a wake-up, a process's exit).
/// Without inotify (a user's instances used up), it degrades to looking every
/// [`NO_INOTIFY_BACKOFF`].
#[derive(Debug)]
pub struct LogWatch {
    inotify: Option<Inotify>,
    buf: Vec<u8>,
    watched: Vec<Watched>,
}

fn file_mask() -> WatchMask {
    WatchMask::MODIFY | WatchMask::CLOSE_WRITE
}

fn dir_mask() -> WatchMask {
    WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM | WatchMask::DELETE
}

impl Default for LogWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl LogWatch {
    pub fn new() -> Self {
        let inotify = Inotify::init()
            .inspect_err(|e| {
                tracing::warn!("no inotify ({e}): logs are read every {NO_INOTIFY_BACKOFF:?}")
            })
            .ok();
        Self {
            inotify,
            buf: vec![0; 16 * 1024],
            watched: Vec::new(),
        }
    }

    /// Follow the log at `path` (which may not exist yet; its directory must).
    pub fn add(&mut self, path: &Path) {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut w = Watched {
            path: path.to_path_buf(),
            name: path.file_name().unwrap_or_default().to_owned(),
            dir: None,
            file: None,
        };
        if let Some(i) = &self.inotify {
            w.dir = i.watches().add(dir, dir_mask()).ok();
            w.file = i.watches().add(path, file_mask()).ok();
        }
        self.watched.push(w);
    }

    /// Block until a followed log changes, one of `also` is readable or `deadline` passes.
    pub fn wait(
        &mut self,
        also: &[BorrowedFd<'_>],
        deadline: Option<Deadline>,
    ) -> std::io::Result<Woke> {
        let Some(inotify) = &mut self.inotify else {
            // A back-off, bounded by NO_INOTIFY_BACKOFF and the deadline: without inotify (this
            // user's instances are used up) a file's growth cannot be waited for.
            let backoff = Deadline::after(NO_INOTIFY_BACKOFF);
            let d = deadline.map_or(backoff, |d| d.min(backoff));
            let also = if also.is_empty() {
                std::thread::sleep(d.remaining());
                Vec::new()
            } else {
                wait_readable(also, Some(d))?
            };
            return Ok(Woke { logs: true, also });
        };
        let mut fds = vec![inotify.as_fd()];
        fds.extend_from_slice(also);
        let ready = wait_readable(&fds, deadline)?;
        let mut logs = false;
        if ready[0] {
            loop {
                let events = match inotify.read_events(&mut self.buf) {
                    Ok(ev) => ev,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                let mut any = false;
                let mut renew = Vec::new();
                for ev in events {
                    any = true;
                    for (i, w) in self.watched.iter().enumerate() {
                        if w.file.as_ref() == Some(&ev.wd) {
                            logs = true;
                        } else if w.dir.as_ref() == Some(&ev.wd) && ev.name == Some(&w.name) {
                            logs = true;
                            renew.push(i);
                        }
                    }
                }
                // The file at a followed path was made, rotated or replaced: watch the new one.
                for i in renew {
                    let w = &mut self.watched[i];
                    w.file = inotify.watches().add(&w.path, file_mask()).ok();
                }
                if !any {
                    break;
                }
            }
        }
        Ok(Woke {
            logs,
            also: ready[1..].to_vec(),
        })
    }
}

/// How a wait on a VM's console ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The ready pattern matched this line.
    Ready(String),
    /// The process followed (QEMU) exited.
    Exited,
    /// The deadline passed.
    TimedOut,
    /// `cancel` was set (Ctrl-C).
    Cancelled,
}

/// Follow `tail` until `ready` matches a line, the process `until` (QEMU) is gone, `timeout`
/// passes or `cancel` is set. Every line goes to `echo`, which says whether to go on (`false`
/// ends the follow as [`WaitOutcome::Cancelled`]: its reader went away). Blocks between lines
/// (inotify), woken by the log, the process's exit or `cancel`.
pub fn follow(
    tail: &mut ConsoleTail,
    ready: Option<&regex::Regex>,
    timeout: Option<Duration>,
    cancel: &Cancel,
    until: Option<&ProcessWatch>,
    echo: &mut dyn FnMut(&str) -> bool,
) -> WaitOutcome {
    let deadline = timeout.map(Deadline::after);
    let wake = wake_pair().ok();
    let _woken = wake.as_ref().map(|(w, _)| {
        let w = w.clone();
        cancel.on_cancel(move || w.wake())
    });
    let mut watch = LogWatch::new();
    watch.add(tail.path());
    loop {
        let exited = until.is_some_and(ProcessWatch::exited);
        for line in tail.lines() {
            if !echo(&line) {
                return WaitOutcome::Cancelled;
            }
            if ready.is_some_and(|r| r.is_match(&line)) {
                return WaitOutcome::Ready(line);
            }
        }
        if exited {
            if let Some(rest) = tail.rest() {
                if !echo(&rest) {
                    return WaitOutcome::Cancelled;
                }
                if ready.is_some_and(|r| r.is_match(&rest)) {
                    return WaitOutcome::Ready(rest);
                }
            }
            return WaitOutcome::Exited;
        }
        if cancel.load(Ordering::SeqCst) {
            return WaitOutcome::Cancelled;
        }
        if deadline.is_some_and(Deadline::expired) {
            return WaitOutcome::TimedOut;
        }
        let mut also: Vec<BorrowedFd<'_>> = Vec::new();
        if let Some((_, fd)) = &wake {
            also.push(fd.as_fd());
        }
        if let Some(p) = until {
            also.push(p.as_fd());
        }
        if let Err(e) = watch.wait(&also, deadline) {
            // A back-off: a wait that fails (inotify's queue overflowed, poll failed) would
            // otherwise spin; the log is read again after it, the deadline still ends the loop.
            tracing::warn!("following {}: {e}", tail.path().display());
            std::thread::sleep(NO_INOTIFY_BACKOFF);
        }
    }
}

/// The last `n` lines of a console log (its rotated `.1` too, if the log holds fewer), for
/// error messages; at most the last 64 KiB of each file are read.
pub fn log_tail(path: &Path, n: usize) -> String {
    fn last_bytes(path: &Path) -> String {
        let Ok(mut f) = File::open(path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(64 << 10);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        // A cut first line is dropped.
        match (start > 0, text.find('\n')) {
            (true, Some(i)) => text[i + 1..].to_string(),
            _ => text,
        }
    }
    let mut text = last_bytes(path);
    if text.lines().count() < n {
        text = last_bytes(&rotated(path)) + &text;
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where a console's lines go, each once, as they arrive.
pub type LineSink = Box<dyn FnMut(&str) + Send>;

/// What a VM's owner does with its console (see [`crate::start_with`]).
pub struct ConsoleOptions {
    /// The bytes of console logs the VM keeps on disk (see [`DEFAULT_LOG_LIMIT`]).
    pub log_limit: u64,
    /// Each line the guest prints (without its line end), as it arrives, once.
    pub on_line: Option<LineSink>,
}

impl std::fmt::Debug for ConsoleOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOptions")
            .field("log_limit", &self.log_limit)
            .field("on_line", &self.on_line.is_some())
            .finish()
    }
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            log_limit: DEFAULT_LOG_LIMIT,
            on_line: None,
        }
    }
}

/// The thread that reads a VM's console socket (see the module's doc).
#[derive(Debug)]
pub(crate) struct ConsolePump {
    stop: Waker,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Splits a byte stream into lines for a sink: whole lines without their line end, a line
/// longer than [`MAX_LINE`] in pieces.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut dyn FnMut(&str)) {
        self.partial.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(i) = self.partial[start..].iter().position(|&b| b == b'\n') {
            let end = start + i;
            let mut line = &self.partial[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            for piece in line.chunks(MAX_LINE) {
                out(&String::from_utf8_lossy(piece));
            }
            if line.is_empty() {
                out("");
            }
            start = end + 1;
        }
        self.partial.drain(..start);
        while self.partial.len() >= MAX_LINE {
            let piece: Vec<u8> = self.partial.drain(..MAX_LINE).collect();
            out(&String::from_utf8_lossy(&piece));
        }
    }

    pub(crate) fn finish(&mut self, out: &mut dyn FnMut(&str)) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            let text = String::from_utf8_lossy(&rest);
            out(text.trim_end_matches('\r'));
        }
    }
}

impl ConsolePump {
    /// Read QEMU's connection on `listener` into `log` and `on_line` until QEMU closes it (or
    /// [`Self::finish`] is called before it connected).
    pub(crate) fn start(
        name: &str,
        listener: UnixListener,
        log: BoundedLog,
        on_line: Option<LineSink>,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = wake_pair()?;
        let thread = std::thread::Builder::new()
            .name(format!("console-{name}"))
            .spawn(move || pump(listener, log, on_line, stopped))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// End the pump once QEMU is gone: what it wrote last is in the log and handed on, its
    /// unfinished last line too.
    pub(crate) fn finish(&mut self) {
        self.stop.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ConsolePump {
    fn drop(&mut self) {
        self.finish();
    }
}

fn pump(
    listener: UnixListener,
    mut log: BoundedLog,
    mut on_line: Option<LineSink>,
    stopped: WakeFd,
) {
    let mut sink = |l: &str| {
        if let Some(f) = on_line.as_mut() {
            f(l)
        }
    };
    // QEMU connects while it starts; a QEMU that never does (it failed) ends with the stop.
    let conn = loop {
        match wait_readable(&[listener.as_fd(), stopped.as_fd()], None) {
            Ok(r) if r[0] => match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if crate::wait::retry(&e) => {}
                Err(e) => {
                    tracing::warn!("console of {}: {e}", log.path().display());
                    return;
                }
            },
            Ok(r) if r[1] => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("console of {}: {e}", log.path().display());
                return;
            }
        }
    };
    drop(listener);
    let mut lines = Lines::default();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut warned = false;
    let mut reader = &conn;
    // After the stop (QEMU is gone) only what is left is read.
    while let Ok(ready) = wait_readable(&[conn.as_fd(), stopped.as_fd()], None) {
        if !ready[0] && ready[1] {
            break;
        }
        if !ready[0] {
            continue;
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if crate::wait::retry(&e) => continue,
            Err(_) => break,
        };
        if let Err(e) = log.write(&buf[..n]) {
            if !warned {
                tracing::warn!("cannot write {}: {e}", log.path().display());
                warned = true;
            }
        }
        lines.push(&buf[..n], &mut sink);
    }
    lines.finish(&mut sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_make_hostile_sequences_visible() {
        let cases: &[(&str, &str)] = &[
            (
                "plain text, tabs\tand unicode: é ✓",
                "plain text, tabs\tand unicode: é ✓",
            ),
            // OSC 52: write the clipboard.
            (
                "\x1b]52;c;ZWNobyBwd25lZA==\x07",
                "\\e]52;c;ZWNobyBwd25lZA==\\a",
            ),
            // OSC 0/2: the window title, ended by ST.
            ("\x1b]0;owned\x1b\\", "\\e]0;owned\\e\\"),
            // Clear the screen, home the cursor, colours.
            (
                "\x1b[2J\x1b[H\x1b[31mred\x1b[0m",
                "\\e[2J\\e[H\\e[31mred\\e[0m",
            ),
            // A carriage return that would overwrite what came before, a backspace, NUL, DEL.
            ("safe\rEVIL", "safe\\rEVIL"),
            ("a\x08b\x00c\x7f", "a\\bb\\x00c\\x7f"),
            // C1 controls: CSI (U+009B) and OSC (U+009D) as single characters.
            (
                "\u{9b}2J\u{9d}52;c;x\u{9c}",
                "\\u{9b}2J\\u{9d}52;c;x\\u{9c}",
            ),
            // Text that reorders itself (a right-to-left override) and isolates.
            (
                "file\u{202e}txt.exe\u{2066}x\u{2069}",
                "file\\u{202e}txt.exe\\u{2066}x\\u{2069}",
            ),
            // DCS, and a line end inside what is handed on as one line.
            ("\x1bP+q\x1b\\\n", "\\eP+q\\e\\\\n"),
        ];
        for (raw, want) in cases {
            let got = escape_control(raw);
            assert_eq!(got, *want, "{raw:?}");
            assert!(
                !got.chars().any(|c| c.is_control() && c != '\t'),
                "{got:?} still holds a control character"
            );
        }
        assert!(matches!(escape_control("nothing to do"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_bounded_log_rotates_and_stays_within_twice_its_rotation_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        std::fs::write(rotated(&p), "an old run").unwrap();
        let mut log = BoundedLog::create(&p, 1000).unwrap();
        assert!(!rotated(&p).exists(), "an old .1 goes with the new log");
        let line = [b'x'; 99];
        for _ in 0..100 {
            log.write(&line).unwrap();
            log.write(b"\n").unwrap();
            let cur = std::fs::metadata(&p).unwrap().len();
            let old = std::fs::metadata(rotated(&p)).map(|m| m.len()).unwrap_or(0);
            assert!(cur <= 1000 && old <= 1000, "{cur} {old}");
        }
        assert!(rotated(&p).exists());
        // A reader that started before the rotations reads a continuous stream from the start
        // of the file it opened.
        let mut a = BoundedLog::append(&p, 1000).unwrap();
        a.write(b"more\n").unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("more\n"));
    }

    #[test]
    fn a_bounded_logs_files_are_private_and_never_followed() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let p = d.path().join("console.log");
        let mut log = BoundedLog::create(&p, 100).unwrap();
        log.write(&[b'x'; 80]).unwrap();
        log.write(&[b'y'; 80]).unwrap();
        assert_eq!((mode(&p), mode(&rotated(&p))), (0o600, 0o600));
        // A link planted at a log's path is refused, its target untouched.
        let target = d.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        for name in ["created", "appended"] {
            let link = d.path().join(name);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let r = match name {
                "created" => BoundedLog::create(&link, 100),
                _ => BoundedLog::append(&link, 100),
            };
            assert!(r.is_err(), "{name}");
        }
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn a_tail_reads_across_rotations_and_restarts_without_losing_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut log = BoundedLog::create(&p, 200).unwrap();
        let mut t = ConsoleTail::new(p.clone());
        assert!(t.lines().is_empty());
        let mut want = Vec::new();
        let mut got = Vec::new();
        for i in 0..50 {
            let l = format!("line number {i}");
            log.write(format!("{l}\r\n").as_bytes()).unwrap();
            want.push(l);
            if i % 7 == 0 {
                got.extend(t.lines());
            }
        }
        got.extend(t.lines());
        // (Two rotations between two reads would lose the file in the middle.)
        assert_eq!(got, want);
        log.write(b"no newline yet").unwrap();
        assert!(t.lines().is_empty());
        assert_eq!(t.rest().as_deref(), Some("no newline yet"));

        // A restart: the old log is kept aside, a new one is written.
        let q = d.path().join("other.log");
        std::fs::write(&q, "first boot, a long line\nunread\n").unwrap();
        let mut t = ConsoleTail::new(q.clone());
        assert_eq!(t.lines(), ["first boot, a long line", "unread"]);
        std::fs::write(d.path().join("x"), "").unwrap();
        std::fs::rename(&q, d.path().join("other.log.prev")).unwrap();
        std::fs::write(&q, "second boot\n").unwrap();
        assert_eq!(t.lines(), ["second boot"]);
        // Truncated in place: shorter than what was read.
        std::fs::write(&q, "3\n").unwrap();
        assert_eq!(t.lines(), ["3"]);
        // From the end, and with the rotated file first.
        std::fs::write(&q, "old\n").unwrap();
        let mut e = ConsoleTail::at_end(q.clone());
        assert!(e.lines().is_empty());
        std::fs::write(rotated(&q), "older\n").unwrap();
        assert_eq!(
            ConsoleTail::with_rotated(q.clone()).lines(),
            ["older", "old"]
        );
    }

    #[test]
    fn lines_are_split_and_long_ones_cut() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.push(b"one\r\ntw", &mut |s| out.push(s.to_string()));
        l.push(b"o\n\nthr", &mut |s| out.push(s.to_string()));
        assert_eq!(out, ["one", "two", ""]);
        let long = vec![b'y'; MAX_LINE * 2 + 5];
        l.push(&long, &mut |s| out.push(s.to_string()));
        assert_eq!(out.len(), 5, "two whole pieces so far");
        assert_eq!(out[3].len(), MAX_LINE);
        assert!(out[3].starts_with("thr"));
        l.finish(&mut |s| out.push(s.to_string()));
        assert_eq!(out.last().unwrap().len(), 8);
    }

    #[test]
    fn follow_stops_on_ready_timeout_exit_and_cancel_and_wakes_on_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        std::fs::write(&p, "booting\nDRYDOCK-READY\nafter\n").unwrap();
        let no = Cancel::new();
        let re = regex::Regex::new("READY").unwrap();
        let mut seen = Vec::new();
        let out = follow(
            &mut ConsoleTail::new(p.clone()),
            Some(&re),
            None,
            &no,
            None,
            &mut |l| {
                seen.push(l.to_string());
                true
            },
        );
        assert_eq!(out, WaitOutcome::Ready("DRYDOCK-READY".into()));
        assert_eq!(seen, ["booting", "DRYDOCK-READY"]);
        let never = regex::Regex::new("NEVER").unwrap();
        let out = follow(
            &mut ConsoleTail::new(p.clone()),
            Some(&never),
            Some(Duration::from_millis(50)),
            &no,
            None,
            &mut |_| true,
        );
        assert_eq!(out, WaitOutcome::TimedOut);
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let watch = ProcessWatch::child(gone.id()).unwrap();
        let out = follow(
            &mut ConsoleTail::new(p.clone()),
            Some(&never),
            None,
            &no,
            Some(&watch),
            &mut |_| true,
        );
        assert_eq!(out, WaitOutcome::Exited);
        gone.wait().unwrap();
        let yes = Cancel::new();
        yes.cancel();
        let out = follow(
            &mut ConsoleTail::new(p.clone()),
            None,
            None,
            &yes,
            None,
            &mut |_| true,
        );
        assert_eq!(out, WaitOutcome::Cancelled);

        // A line written later wakes the follow at once; a cancel from another thread too.
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
                f.write_all(b"LATE\n").unwrap();
            })
        };
        let late = regex::Regex::new("LATE").unwrap();
        let t = std::time::Instant::now();
        let out = follow(
            &mut ConsoleTail::new(p.clone()),
            Some(&late),
            Some(Duration::from_secs(30)),
            &no,
            None,
            &mut |_| true,
        );
        assert_eq!(out, WaitOutcome::Ready("LATE".into()));
        assert!(t.elapsed() < Duration::from_secs(5));
        writer.join().unwrap();
        let c = std::sync::Arc::new(Cancel::new());
        let c2 = c.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c2.cancel();
        });
        let out = follow(
            &mut ConsoleTail::new(p),
            Some(&never),
            Some(Duration::from_secs(30)),
            &c,
            None,
            &mut |_| true,
        );
        assert_eq!(out, WaitOutcome::Cancelled);
        canceller.join().unwrap();
    }

    #[test]
    fn the_pump_writes_the_log_and_hands_every_line_on_once() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("console.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let log_path = d.path().join("console.log");
        let log = BoundedLog::create(&log_path, rotate_at(MIN_LOG_LIMIT)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut pump = ConsolePump::start(
            "t",
            listener,
            log,
            Some(Box::new(move |l: &str| {
                let _ = tx.send(l.to_string());
            })),
        )
        .unwrap();
        let mut qemu = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        qemu.write_all(b"hello\r\n\x1b[2Jworld\npartial").unwrap();
        drop(qemu);
        pump.finish();
        let got: Vec<String> = rx.try_iter().collect();
        assert_eq!(got, ["hello", "\x1b[2Jworld", "partial"]);
        assert_eq!(
            std::fs::read(&log_path).unwrap(),
            b"hello\r\n\x1b[2Jworld\npartial"
        );
        // A QEMU that never connects: the stop ends the pump.
        let sock2 = d.path().join("c2.sock");
        let log = BoundedLog::create(&d.path().join("c2.log"), 1 << 20).unwrap();
        let mut p2 =
            ConsolePump::start("t2", UnixListener::bind(&sock2).unwrap(), log, None).unwrap();
        p2.finish();
    }
}
