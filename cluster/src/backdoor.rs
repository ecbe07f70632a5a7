//! The backdoor: a root shell in the guest on a virtio console (`/dev/hvc0`), connected to a
//! unix socket drydock listens on. "Ready" is the guest's line [`READY_LINE`] (as NixOS's
//! `test-instrumentation.nix` prints it). Each call is POSIX `sh` that works in bash and busybox
//! `sh` alike: the command travels as one single-quoted word (so a syntax error is the command's
//! own failure, not the protocol's) and is `eval`ed in a subshell with stdin from `/dev/null` and
//! stdout and stderr in two files of a private folder; a watchdog kills it at the deadline, or
//! earlier when drydock sends it a line (the caller went away: [`Backdoor::exec_for`]); then
//! one reply line carries the status and both outputs base64-encoded:
//!
//! ```text
//! DRYDOCK-<nonce> <status> <base64 stdout> <base64 stderr> DRYDOCK-<nonce>-END
//! ```
//!
//! so both streams arrive complete and binary-safe, and anything else the console carries
//! (echo, noise) is skipped. The nonce is 128 bits from `/dev/urandom`, new for each call, and
//! what the console carried before a call was sent is dropped: a guest process writing forged
//! replies to `/dev/hvc0` cannot guess the marker of a call that is not sent yet, so its lines
//! are noise like any other. A call that hits its deadline has status 124 (130 if it was
//! cancelled) and the shell answers the next call; a shell that does not answer within a grace
//! period after the deadline is wedged, and the backdoor refuses further calls. Calls on one
//! backdoor queue on its mutex.
//!
//! A guest may restart its backdoor (NixOS restarts `backdoor.service` when a switch changes
//! it): the new shell prints [`READY_LINE`] again. That line arriving while a call waits for its
//! reply means the shell that ran the call is gone, so the call fails with
//! [`BackdoorError::Restarted`] and the connection stays usable: the new shell takes the next
//! call (its state is fresh; each call line makes what it needs). What the old call's command
//! did is not known; a caller that must know (a switch) left its own record in the guest.
//!
//! QEMU drops what a guest writes to a `virtconsole` whose socket is full (console ports are
//! not throttled, unlike `virtserialport`: QEMU's `virtio-console.c` drops on `EAGAIN` rather
//! than stall the guest's hvc driver), so a reply is sent with flow control: the guest writes it
//! in chunks of [`CHUNK`] bytes and reads one line (drydock's `:`, a no-op if it ever reaches the
//! shell as a command) before each next chunk; drydock acknowledges each whole chunk it has read,
//! so no more than a chunk is ever in flight. Each byte of a reply is also scanned once, and a
//! reply that lost bytes anyway fails to decode (an error, never wrong output).
//!
//! An interactive session ([`Backdoor::shell`]) runs a second shell, `sh -i`, on the console and
//! relays bytes both ways until it exits; a marker line then tells drydock the backdoor's own
//! shell reads calls again.
//!
//! Line building and reply parsing are pure and tested as data; [`Backdoor`] drives a stream.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use drydock_gc::Deadline;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// The line a guest's backdoor prints when its shell is ready.
pub const READY_LINE: &str = "Spawning backdoor root shell...";
/// How long past a call's deadline the shell may take to report the kill.
const GRACE: Duration = Duration::from_secs(10);
/// A reply travels in chunks of this many bytes, each acknowledged (see the module docs).
pub const CHUNK: usize = 32 * 1024;
/// What drydock sends the guest to cancel the call running there (its watchdog reads it); a
/// no-op should it reach the shell itself (the call had just ended).
pub const CANCEL_LINE: &str = ":\n";
/// Silence after which drydock acknowledges again, in case a chunk boundary was missed.
const ACK_IDLE: Duration = Duration::from_secs(1);
/// How long a shell session waits for the calls before it.
const SHELL_WAIT: Duration = Duration::from_secs(600);
/// How long a shell session whose client left may take to end (its last command to finish).
const SESSION_END: Duration = Duration::from_secs(3600);
/// A reply line is refused beyond this size (base64 of both streams).
const MAX_REPLY: usize = 256 << 20;
/// At most this much waiting input is dropped before a call (a guest that floods the console
/// cannot hold the call there; what it sends later is skipped as noise).
const DRAIN_MAX: usize = 4 << 20;

/// What a command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command's exit status; 124 if its deadline hit.
    pub status: i32,
}

/// Why a call could not complete.
#[derive(Debug, thiserror::Error)]
pub enum BackdoorError {
    #[error("the backdoor connection failed")]
    Io(#[source] std::io::Error),
    #[error("the guest closed the backdoor")]
    Closed,
    #[error("the guest did not print {READY_LINE:?} within {} s", .0.as_secs())]
    NotReady(Duration),
    #[error("the guest's shell did not answer within {} s of the command's deadline; the backdoor is unusable until the machine restarts", GRACE.as_secs())]
    Wedged,
    #[error("the backdoor is unusable after an earlier failure")]
    Broken,
    #[error("a malformed reply from the guest: {0}")]
    Malformed(String),
    #[error("the guest's reply exceeds {} MiB", MAX_REPLY >> 20)]
    TooLarge,
    #[error("interrupted")]
    Cancelled,
    #[error("cannot read a call's nonce from /dev/urandom")]
    Nonce(#[source] std::io::Error),
    #[error("the backdoor stayed busy for {} s (a `shell` session, or a command it left running, holds it)", .0.as_secs())]
    Busy(Duration),
    /// The machine lost what the backdoor needs (see [`Backdoor::close`]).
    #[error("{0}")]
    Gone(String),
    /// The guest printed [`READY_LINE`] while the call waited for its reply: the shell running
    /// it was replaced by a new one, which is ready for the next call.
    #[error(
        "the guest's backdoor restarted during the call (it printed {READY_LINE:?} again): whether the command ran to its end is not known; the new backdoor shell takes the next call"
    )]
    Restarted,
    /// A restored guest's `date -s` (setting its clock to the host's) failed with this status.
    #[error("setting the restored guest's clock failed (date exited {0})")]
    Clock(i32),
}

impl BackdoorError {
    pub fn is_bad_input(&self) -> bool {
        false
    }
}

/// Whether the console line `line` is a backdoor shell's ready line ([`READY_LINE`] at its end:
/// a guest may print it after other output on the same line).
fn is_ready_line(line: &str) -> bool {
    line.trim_end().ends_with(READY_LINE)
}

/// `s` as one single-quoted word of POSIX `sh`: each `'` becomes `'\''`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A new call's nonce: 128 bits from the kernel's random source, as 32 hex digits.
pub(crate) fn nonce() -> Result<String, BackdoorError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(BackdoorError::Nonce)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The text that runs `cmd` as the call marked `nonce` with a deadline of `secs` seconds. It
/// starts as few processes as it can, since under emulation each costs the guest milliseconds:
/// the command travels single-quoted and is `eval`ed in a subshell; its outputs go to two files
/// in a private folder the shell keeps across calls (`DRYDOCK_TMP`, made once); an empty output
/// costs no encoder; and a reply shorter than a chunk is printed by the shell's own `printf`.
/// A call of `true` starts the subshell and the watchdog, nothing else.
///
/// The watchdog waits with the shell's own `read -t` on the console (fd 9, a copy of the
/// shell's input: a background job's own input is `/dev/null`): at the deadline it marks the
/// call timed out (124), and a line from drydock ([`CANCEL_LINE`]) before it marks it
/// cancelled (130); either way it kills the command with everything it started (`drydock_k`:
/// stopped, then its children found in `/proc` killed first, then it). The command never sees
/// fd 9.
pub fn call_line(nonce: &str, cmd: &str, secs: u64) -> String {
    let m = format!("DRYDOCK-{nonce}");
    let code = sh_quote(cmd);
    let small = CHUNK - 2;
    format!(
        r#"{{ [ -d "$DRYDOCK_TMP" ] || DRYDOCK_TMP=$(mktemp -d); }} && exec 9<&0 && {{ d=$DRYDOCK_TMP; drydock_k() {{ kill -STOP $1 2>/dev/null; for f in /proc/[0-9]*/stat; do read -r c x y q z <$f && [ "$q" = "$1" ] && drydock_k $c; done 2>/dev/null; kill -9 $1 2>/dev/null; }}; (eval {code}) </dev/null 9<&- >"$d/o" 2>"$d/e" & p=$!; {{ if read -t {secs} -r x <&9; then : >"$d/c{nonce}"; else : >"$d/t{nonce}"; fi; drydock_k $p; }} & w=$!; wait $p; s=$?; kill $w 2>/dev/null; wait $w 2>/dev/null; [ -e "$d/t{nonce}" ] && {{ s=124; rm -f "$d/t{nonce}"; }}; [ -e "$d/c{nonce}" ] && {{ s=130; rm -f "$d/c{nonce}"; }}; o=; e=; [ -s "$d/o" ] && o=$(base64 -w 0 "$d/o"); [ -s "$d/e" ] && e=$(base64 -w 0 "$d/e"); r="{m} $s $o $e {m}-END"; o=; e=; if [ ${{#r}} -lt {small} ]; then printf '\n%s\n' "$r"; else printf '\n%s\n' "$r" >"$d/r"; n=$((${{#r}}+2)); k=0; while [ $((k*{CHUNK})) -lt $n ]; do dd if="$d/r" bs={CHUNK} skip=$k count=1 2>/dev/null; k=$((k+1)); [ $((k*{CHUNK})) -lt $n ] && read -r a; done; rm -f "$d/r"; fi; r=; }}
"#
    )
}

/// Parse a console line as the reply to the call marked `nonce`: `None` if it is not one.
pub fn parse_reply(nonce: &str, line: &str) -> Option<Result<ExecOutput, BackdoorError>> {
    let line = line.trim_end_matches(['\r', '\n']);
    let head = format!("DRYDOCK-{nonce} ");
    let tail = format!(" DRYDOCK-{nonce}-END");
    let body = line.strip_prefix(&head)?.strip_suffix(&tail)?;
    let parts: Vec<&str> = body.split(' ').collect();
    let [status, out, err] = parts[..] else {
        return Some(Err(BackdoorError::Malformed(format!(
            "{} fields",
            parts.len()
        ))));
    };
    let decode = |s: &str, what: &str| {
        B64.decode(s)
            .map_err(|e| BackdoorError::Malformed(format!("{what}: {e}")))
    };
    Some((|| {
        Ok(ExecOutput {
            status: status
                .parse()
                .map_err(|_| BackdoorError::Malformed(format!("status {status:?}")))?,
            stdout: decode(out, "stdout")?,
            stderr: decode(err, "stderr")?,
        })
    })())
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    /// Bytes read past the last line.
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no newline (a long reply is scanned once).
    scanned: usize,
    broken: bool,
    /// While a call's reply is awaited: its head (`DRYDOCK-<nonce> `) and the chunks
    /// acknowledged.
    acking: Option<(Vec<u8>, usize)>,
}

impl Conn {
    /// Drop what the guest sent before the call about to be made: the lines buffered, and what
    /// already waits on the socket (at most [`DRAIN_MAX`] bytes).
    fn drain(&mut self) -> Result<(), BackdoorError> {
        let mut dropped = self.pending.len();
        self.pending.clear();
        self.scanned = 0;
        self.stream
            .set_nonblocking(true)
            .map_err(BackdoorError::Io)?;
        let mut buf = [0u8; 64 * 1024];
        let result = loop {
            if dropped >= DRAIN_MAX {
                break Ok(());
            }
            match self.stream.read(&mut buf) {
                Ok(0) => break Err(BackdoorError::Closed),
                Ok(n) => dropped += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(BackdoorError::Io(e)),
            }
        };
        self.stream
            .set_nonblocking(false)
            .map_err(BackdoorError::Io)?;
        if dropped > 0 {
            tracing::debug!(dropped, "dropped console output sent before the call");
        }
        result
    }

    /// Acknowledge every whole chunk of the reply in progress (`pending` starts with its head
    /// once the lines before it were taken; the chunk count includes the reply's leading
    /// newline). With `idle`, acknowledge once more anyway.
    fn ack(&mut self, idle: bool) -> Result<(), BackdoorError> {
        let Some((head, sent)) = &mut self.acking else {
            return Ok(());
        };
        if !self.pending.starts_with(head) {
            return Ok(());
        }
        let got = 1 + self.pending.len();
        let mut acks = 0;
        while got >= (*sent + 1) * CHUNK {
            *sent += 1;
            acks += 1;
        }
        if idle {
            acks += 1;
        }
        for _ in 0..acks {
            self.stream.write_all(b":\n").map_err(BackdoorError::Io)?;
        }
        Ok(())
    }

    /// The next console line, waiting until `deadline`; `Ok(None)` when it passed.
    fn line(&mut self, deadline: Deadline) -> Result<Option<String>, BackdoorError> {
        match self.line_or(deadline, &[])? {
            Got::Line(l) => Ok(Some(l)),
            Got::Late | Got::Watched => Ok(None),
        }
    }

    /// [`Self::line`], also ending when one of `watch` becomes readable ([`Got::Watched`]).
    fn line_or(
        &mut self,
        deadline: Deadline,
        watch: &[BorrowedFd<'_>],
    ) -> Result<Got, BackdoorError> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(i) = self.pending[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
            {
                let rest = self.pending.split_off(self.scanned + i + 1);
                let line = std::mem::replace(&mut self.pending, rest);
                self.scanned = 0;
                return Ok(Got::Line(String::from_utf8_lossy(&line).into_owned()));
            }
            self.scanned = self.pending.len();
            if self.pending.len() > MAX_REPLY {
                return Err(BackdoorError::TooLarge);
            }
            if deadline.expired() {
                return Ok(Got::Late);
            }
            let wait = if self.acking.is_some() {
                Deadline::after(ACK_IDLE).min(deadline)
            } else {
                deadline
            };
            let mut fds = vec![self.stream.as_fd()];
            fds.extend_from_slice(watch);
            let ready = drydock_vm::wait_readable(&fds, Some(wait)).map_err(BackdoorError::Io)?;
            if ready[1..].iter().any(|r| *r) {
                return Ok(Got::Watched);
            }
            if !ready[0] {
                if wait.expired() && !deadline.expired() {
                    self.ack(true)?;
                }
                continue;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(BackdoorError::Closed),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    self.ack(false)?;
                }
                Err(e) if drydock_vm::retry(&e) => {}
                Err(e) => return Err(BackdoorError::Io(e)),
            }
        }
    }
}

/// What [`Conn::line_or`] got.
#[derive(Debug)]
enum Got {
    Line(String),
    /// The deadline passed.
    Late,
    /// The watched descriptor became readable.
    Watched,
}

/// Whether the peer of `client` (an `exec` caller) went away: its connection is readable and
/// reads end-of-file (or fails). Anything it sent after its request is read and dropped.
fn peer_gone(client: &UnixStream) -> bool {
    let mut buf = [0u8; 512];
    if client.set_nonblocking(true).is_err() {
        return true;
    }
    let gone = loop {
        match (&*client).read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break true,
        }
    };
    let _ = client.set_nonblocking(false);
    gone
}

/// A guest's backdoor shell. Calls queue: one runs at a time.
#[derive(Debug)]
pub struct Backdoor {
    /// The connection; `None` while a call or a session has it.
    conn: Mutex<Option<Conn>>,
    /// Signalled each time the connection is given back.
    returned: Condvar,
    /// The same socket, to shut it down under whoever holds the connection ([`Self::close`]).
    shutdown: Option<UnixStream>,
    /// Why the backdoor was closed, if it was.
    closed: Mutex<Option<String>>,
}

/// The connection, lent to one call or session; given back (and the next waiter woken) when
/// dropped, a panic's unwinding included.
struct Lease<'a> {
    owner: &'a Backdoor,
    conn: Option<Conn>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a lease holds the connection until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds the connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            *self
                .owner
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(c);
            self.owner.returned.notify_one();
        }
    }
}

impl Backdoor {
    /// Read the console until the guest prints [`READY_LINE`] (lines before it go to `seen`),
    /// at most `within`, or until one of `cancel` is readable (a stop, a process's exit: waited
    /// on with the console).
    pub fn wait_ready(
        stream: UnixStream,
        within: Duration,
        cancel: &[BorrowedFd<'_>],
        seen: &mut dyn FnMut(&str),
    ) -> Result<Self, BackdoorError> {
        let mut conn = Conn {
            stream,
            pending: Vec::new(),
            scanned: 0,
            broken: false,
            acking: None,
        };
        let deadline = Deadline::after(within);
        loop {
            match conn.line_or(deadline, cancel)? {
                Got::Line(l) if is_ready_line(&l) => {
                    let shutdown = conn.stream.try_clone().ok();
                    return Ok(Self {
                        conn: Mutex::new(Some(conn)),
                        returned: Condvar::new(),
                        shutdown,
                        closed: Mutex::new(None),
                    });
                }
                Got::Line(l) => seen(l.trim_end()),
                Got::Late => return Err(BackdoorError::NotReady(within)),
                Got::Watched => return Err(BackdoorError::Cancelled),
            }
        }
    }

    /// The backdoor of a guest restored from a snapshot, whose shell is already running (it
    /// prints no ready line): what it sent before the first call is dropped as usual.
    pub fn attached(stream: UnixStream) -> Self {
        let shutdown = stream.try_clone().ok();
        Self {
            conn: Mutex::new(Some(Conn {
                stream,
                pending: Vec::new(),
                scanned: 0,
                broken: false,
                acking: None,
            })),
            returned: Condvar::new(),
            shutdown,
            closed: Mutex::new(None),
        }
    }

    /// Give the backdoor up because the machine cannot serve it any more (`why`, e.g. its
    /// store server died): the connection is shut down under the call or session that holds
    /// it, which fails at once, and every later call fails with `why`.
    pub fn close(&self, why: &str) {
        *self.closed.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.to_string());
        if let Some(s) = &self.shutdown {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Why the backdoor was closed, if it was.
    fn closed(&self) -> Option<BackdoorError> {
        self.closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .map(BackdoorError::Gone)
    }

    /// Run `cmd` in the guest's shell; at `timeout` it is killed and the status is 124.
    pub fn exec(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput, BackdoorError> {
        self.exec_for(cmd, timeout, None)
    }

    /// [`Self::exec`] on behalf of the caller at the other end of `client`: if it goes away
    /// (its connection closes) while the command runs, the command is killed in the guest at
    /// once (status 130) and the backdoor is free for the next call.
    pub fn exec_for(
        &self,
        cmd: &str,
        timeout: Duration,
        client: Option<&UnixStream>,
    ) -> Result<ExecOutput, BackdoorError> {
        if let Some(e) = self.closed() {
            return Err(e);
        }
        let mut conn = self.lock_within(timeout)?;
        if conn.broken {
            return Err(self.closed().unwrap_or(BackdoorError::Broken));
        }
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let result = (|| {
            let nonce = nonce()?;
            conn.drain()?;
            conn.stream
                .write_all(call_line(&nonce, cmd, secs).as_bytes())
                .map_err(BackdoorError::Io)?;
            let deadline = Deadline::after(Duration::from_secs(secs) + GRACE);
            conn.acking = Some((format!("DRYDOCK-{nonce} ").into_bytes(), 0));
            let mut watch = client;
            loop {
                let fds: Vec<BorrowedFd<'_>> = watch.iter().map(|c| c.as_fd()).collect();
                match conn.line_or(deadline, &fds)? {
                    Got::Line(l) => {
                        if let Some(r) = parse_reply(&nonce, &l) {
                            return r;
                        }
                        // A new shell: the one running the call is gone (the module's doc).
                        if is_ready_line(&l) {
                            tracing::info!(%nonce, "the guest's backdoor restarted during a call");
                            return Err(BackdoorError::Restarted);
                        }
                    }
                    Got::Watched => {
                        if watch.is_some_and(peer_gone) {
                            tracing::debug!(%nonce, "the caller went away: cancelling its command");
                            conn.stream
                                .write_all(CANCEL_LINE.as_bytes())
                                .map_err(BackdoorError::Io)?;
                            watch = None;
                        }
                    }
                    Got::Late => return Err(BackdoorError::Wedged),
                }
            }
        })();
        conn.acking = None;
        // A malformed reply was still one whole line: the next call finds its own reply. A
        // restarted shell is a new one, ready for the next call.
        if matches!(&result, Err(e) if !matches!(e, BackdoorError::Malformed(_) | BackdoorError::Restarted))
        {
            conn.broken = true;
        }
        match (result, self.closed()) {
            (Err(BackdoorError::Closed | BackdoorError::Io(_)), Some(why)) => Err(why),
            (r, _) => r,
        }
    }

    /// The connection, waiting at most `within` for the call or session before us.
    fn lock_within(&self, within: Duration) -> Result<Lease<'_>, BackdoorError> {
        let free = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut free, _) = self
            .returned
            .wait_timeout_while(free, within, |c| c.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        match free.take() {
            Some(conn) => Ok(Lease {
                owner: self,
                conn: Some(conn),
            }),
            None => Err(BackdoorError::Busy(within)),
        }
    }

    /// An interactive session: run `sh -i` (prompt `prompt`) on the console and relay bytes
    /// between it and `client` until that shell exits. When the client leaves (EOF), the shell
    /// is told to `exit`; input that arrives after it exited is drained, never run by the
    /// backdoor's own shell. If a command still runs there, the session ends when it does;
    /// calls wait for that, each within its own deadline.
    /// `started` runs once the session's shell is there, before any of its bytes are relayed.
    pub fn shell(
        &self,
        client: &UnixStream,
        prompt: &str,
        size: Option<(u16, u16)>,
        started: &mut dyn FnMut(),
    ) -> Result<(), BackdoorError> {
        self.session(client, &Session::Shell { prompt }, size, started)
    }

    /// A session as [`Backdoor::shell`]'s that runs the shell text `script` (stderr merged into
    /// stdout) instead of an interactive shell: `exec -t`.
    pub fn run_tty(
        &self,
        client: &UnixStream,
        script: &str,
        size: Option<(u16, u16)>,
        started: &mut dyn FnMut(),
    ) -> Result<(), BackdoorError> {
        self.session(client, &Session::Command { script }, size, started)
    }

    fn session(
        &self,
        client: &UnixStream,
        what: &Session<'_>,
        size: Option<(u16, u16)>,
        started: &mut dyn FnMut(),
    ) -> Result<(), BackdoorError> {
        if let Some(e) = self.closed() {
            return Err(e);
        }
        let mut conn = self.lock_within(SHELL_WAIT)?;
        if conn.broken {
            return Err(self.closed().unwrap_or(BackdoorError::Broken));
        }
        let result = nonce().and_then(|nonce| {
            conn.drain()?;
            relay_shell(&mut conn, client, &nonce, what, size, started)
        });
        if result.is_err() {
            conn.broken = true;
        }
        result
    }
}

/// What a session runs.
#[derive(Debug, Clone, Copy)]
pub enum Session<'a> {
    /// An interactive shell with this prompt.
    Shell { prompt: &'a str },
    /// This shell text, its stderr merged into its stdout.
    Command { script: &'a str },
}

/// The text that starts the session marked `nonce` (see [`Backdoor::shell`]).
pub fn shell_line(nonce: &str, what: &Session<'_>, size: Option<(u16, u16)>) -> String {
    let stty = size
        .map(|(r, c)| format!("stty rows {r} cols {c} 2>/dev/null; "))
        .unwrap_or_default();
    let run = match what {
        Session::Shell { prompt } => format!("PS1={} sh -i 2>&1", sh_quote(prompt)),
        Session::Command { script } => format!("(eval {}) 2>&1", sh_quote(script)),
    };
    format!(
        "printf '\\nDRYDOCK-{nonce}-SHELL\\n'; {stty}{run}; while read -t 1 -r DRYDOCK_X; do :; done; printf '\\nDRYDOCK-{nonce}-SHELL-END\\n'\n"
    )
}

fn relay_shell(
    conn: &mut Conn,
    client: &UnixStream,
    nonce: &str,
    what: &Session<'_>,
    size: Option<(u16, u16)>,
    started: &mut dyn FnMut(),
) -> Result<(), BackdoorError> {
    let start = format!("DRYDOCK-{nonce}-SHELL");
    let end = format!("\nDRYDOCK-{nonce}-SHELL-END\n").into_bytes();
    conn.stream
        .write_all(shell_line(nonce, what, size).as_bytes())
        .map_err(BackdoorError::Io)?;
    let deadline = Deadline::after(GRACE);
    loop {
        match conn.line(deadline)? {
            Some(l) if l.trim_end() == start => break,
            Some(_) => {}
            None => return Err(BackdoorError::Wedged),
        }
    }
    started();
    let ended = std::sync::Arc::new(AtomicBool::new(false));
    let left = std::sync::Arc::new(Mutex::new(None::<Deadline>));
    let mut to_guest = conn.stream.try_clone().map_err(BackdoorError::Io)?;
    let mut from_client = client.try_clone().map_err(BackdoorError::Io)?;
    let (ended2, left2) = (ended.clone(), left.clone());
    // A client that leaves tells an interactive shell to exit; a command has no such word (it
    // may have ended already, and the backdoor's own shell would read it).
    let farewell: &'static [u8] = match what {
        Session::Shell { .. } => b"\nexit\n",
        Session::Command { .. } => b"",
    };
    // The input thread says the client left (the session's end now has a deadline).
    let (client_left, client_left_fd) = drydock_vm::wake_pair().map_err(BackdoorError::Io)?;
    let input = std::thread::Builder::new()
        .name("shell-input".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = from_client.read(&mut buf).unwrap_or(0);
                if ended2.load(Ordering::SeqCst) {
                    return;
                }
                if n == 0 {
                    *left2.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Deadline::after(SESSION_END));
                    client_left.wake();
                    let _ = to_guest.write_all(farewell);
                    return;
                }
                if to_guest.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })
        .map_err(BackdoorError::Io)?;
    let mut out = client;
    let mut buf = std::mem::take(&mut conn.pending);
    conn.scanned = 0;
    let mut chunk = [0u8; 64 * 1024];
    let result = loop {
        if let Some(i) = buf.windows(end.len()).position(|w| w == end.as_slice()) {
            let _ = out.write_all(&buf[..i]);
            conn.pending = buf.split_off(i + end.len());
            break Ok(());
        }
        let keep = end.len() - 1;
        if buf.len() > keep {
            let _ = out.write_all(&buf[..buf.len() - keep]);
            buf.drain(..buf.len() - keep);
        }
        // The client left and the session's shell was told to exit: it does once the command
        // running there (if any) ends. Until then calls wait their turn (or give up at their
        // deadline); past SESSION_END the backdoor is given up as wedged.
        let gone = *left.lock().unwrap_or_else(|e| e.into_inner());
        if gone.is_some_and(Deadline::expired) {
            break Err(BackdoorError::Wedged);
        }
        // The guest's next bytes, or (until the client left) the client leaving.
        let mut fds = vec![conn.stream.as_fd()];
        if gone.is_none() {
            fds.push(client_left_fd.as_fd());
        }
        match drydock_vm::wait_readable(&fds, gone) {
            Ok(r) if r[0] => {}
            Ok(_) => continue,
            Err(e) => break Err(BackdoorError::Io(e)),
        }
        match conn.stream.read(&mut chunk) {
            Ok(0) => break Err(BackdoorError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if crate::wire::try_again(&e) => {}
            Err(e) => break Err(BackdoorError::Io(e)),
        }
    };
    ended.store(true, Ordering::SeqCst);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = input.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn replies_parse_or_are_skipped() {
        let b = |s: &[u8]| B64.encode(s);
        let ok = format!(
            "DRYDOCK-7 3 {} {} DRYDOCK-7-END\r\n",
            b(b"out\0\xff"),
            b(b"err")
        );
        assert_eq!(
            parse_reply("7", &ok).unwrap().unwrap(),
            ExecOutput {
                stdout: b"out\0\xff".to_vec(),
                stderr: b"err".to_vec(),
                status: 3
            }
        );
        let empty = "DRYDOCK-2 0   DRYDOCK-2-END";
        let e = parse_reply("2", empty).unwrap().unwrap();
        assert_eq!((e.status, e.stdout.len(), e.stderr.len()), (0, 0, 0));
        for other in [
            "noise",
            "DRYDOCK-71 0   DRYDOCK-71-END",
            &ok.replace("DRYDOCK-7", "DRYDOCK-8"),
            "d=$(mktemp -d) && printf '\\n%s %s ' DRYDOCK-7",
        ] {
            assert!(parse_reply("7", other).is_none(), "{other}");
        }
        assert!(matches!(
            parse_reply("1", "DRYDOCK-1 x   DRYDOCK-1-END"),
            Some(Err(BackdoorError::Malformed(_)))
        ));
        assert!(matches!(
            parse_reply("1", "DRYDOCK-1 0 !! DRYDOCK-1-END"),
            Some(Err(BackdoorError::Malformed(_)))
        ));
    }

    #[test]
    fn forged_replies_with_guessed_markers_are_never_taken() {
        // The guest is this test, on a socketpair: it knows the protocol, floods the console
        // with the replies a sequential marker would have (before, during and after calls),
        // replays the previous call's marker, and answers each call for real only once it saw
        // the call's marker.
        let (ours, mut guest) = UnixStream::pair().unwrap();
        fn forged(marker: &str) -> String {
            format!(
                "DRYDOCK-{marker} 0 {}  DRYDOCK-{marker}-END\n",
                B64.encode("forged")
            )
        }
        // Many small writes would fill the socket's buffer (each costs a whole buffer): one each.
        fn flood(ns: std::ops::RangeInclusive<u64>) -> String {
            ns.map(|n| forged(&n.to_string())).collect()
        }
        guest
            .write_all(format!("{READY_LINE}\n").as_bytes())
            .unwrap();
        let b = Backdoor::wait_ready(ours, Duration::from_secs(5), &[], &mut |_| {}).unwrap();
        guest.write_all(flood(1..=300).as_bytes()).unwrap();
        let guest_side = std::thread::spawn(move || {
            let mut calls = std::io::BufReader::new(guest.try_clone().unwrap());
            let mut nonces: Vec<String> = Vec::new();
            for i in 0..4 {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut calls, &mut line).unwrap();
                let nonce = line
                    .split("r=\"DRYDOCK-")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .unwrap()
                    .to_string();
                let mut out = flood(301..=600);
                if let Some(previous) = nonces.last() {
                    out.push_str(&forged(previous));
                }
                let real = B64.encode(format!("real {i}"));
                out.push_str(&format!(
                    "\nDRYDOCK-{nonce} {i} {real}  DRYDOCK-{nonce}-END\n"
                ));
                // A replay of this very reply, for the next call to take.
                out.push_str(&forged(&nonce));
                guest.write_all(out.as_bytes()).unwrap();
                nonces.push(nonce);
            }
            nonces
        });
        for i in 0..4 {
            let r = b.exec("true", Duration::from_secs(10)).unwrap();
            assert_eq!(
                (r.status, String::from_utf8(r.stdout).unwrap()),
                (i, format!("real {i}"))
            );
        }
        let nonces = guest_side.join().unwrap();
        for n in &nonces {
            assert!(
                n.len() == 32 && n.chars().all(|c| c.is_ascii_hexdigit()),
                "{n}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = nonces.iter().collect();
        assert_eq!(distinct.len(), 4, "{nonces:?}");
    }

    #[test]
    fn input_that_came_before_a_call_is_dropped() {
        let (ours, mut guest) = UnixStream::pair().unwrap();
        let mut conn = Conn {
            stream: ours,
            pending: b"half a li".to_vec(),
            scanned: 4,
            broken: false,
            acking: None,
        };
        guest.write_all(b"ne\nan old line\nand more").unwrap();
        conn.drain().unwrap();
        assert!(conn.pending.is_empty());
        guest.write_all(b"\nnew\n").unwrap();
        let soon = Deadline::after(Duration::from_secs(5));
        assert_eq!(conn.line(soon).unwrap().as_deref(), Some("\n"));
        assert_eq!(conn.line(soon).unwrap().as_deref(), Some("new\n"));
        // The socket is blocking again (reads wait for their deadline).
        let t = Instant::now();
        assert_eq!(
            conn.line(Deadline::after(Duration::from_millis(200)))
                .unwrap(),
            None
        );
        assert!(t.elapsed() >= Duration::from_millis(150));
        // A guest that closed the console is told apart from one with nothing to say.
        drop(guest);
        assert!(matches!(conn.drain(), Err(BackdoorError::Closed)));
    }

    #[test]
    fn the_call_line_quotes_the_command_as_one_word() {
        let l = call_line("5", "echo 'hi' | tr a-z A-Z\nexit 3", 30);
        assert!(l.contains(r"(eval 'echo '\''hi'\'' | tr a-z A-Z"), "{l}");
        assert!(l.ends_with("}\n"));
        assert!(l.contains("read -t 30 -r x <&9;"));
        // The command never sees the copy of the console the watchdog reads.
        assert!(l.contains("</dev/null 9<&- >"));
        assert!(l.contains("drydock_k $p;"));
        // The watchdog's marks are the call's own.
        assert!(
            l.contains(r#": >"$d/c5""#) && l.contains(r#": >"$d/t5""#),
            "{l}"
        );
        assert!(l.contains("DRYDOCK-5-END"));
        for (s, q) in [
            ("", "''"),
            ("a b", "'a b'"),
            ("'", r"''\'''"),
            ("$x`y`", "'$x`y`'"),
        ] {
            assert_eq!(sh_quote(s), q);
        }
    }

    /// The nonce of the call line `line` (as the guest would see it).
    fn nonce_of(line: &str) -> String {
        line.split("r=\"DRYDOCK-")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap()
            .to_string()
    }

    /// A real reply to the call marked `nonce`, with `out` as its stdout.
    fn reply(nonce: &str, status: i32, out: &str) -> String {
        format!(
            "\nDRYDOCK-{nonce} {status} {}  DRYDOCK-{nonce}-END\n",
            B64.encode(out)
        )
    }

    #[test]
    fn a_ready_line_during_a_call_is_a_restart_and_the_next_call_works() {
        // The guest is this test: it takes the first call, then "restarts" its backdoor (a new
        // shell prints the ready line, after some noise of the old one's death); the new shell
        // answers the next call on the same connection.
        let (ours, mut guest) = UnixStream::pair().unwrap();
        guest
            .write_all(format!("{READY_LINE}\n").as_bytes())
            .unwrap();
        let b = Backdoor::wait_ready(ours, Duration::from_secs(5), &[], &mut |_| {}).unwrap();
        let guest_side = std::thread::spawn(move || {
            let mut calls = std::io::BufReader::new(guest.try_clone().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut calls, &mut line).unwrap();
            let first = nonce_of(&line);
            guest
                .write_all(format!("Killed\r\nboot noise {READY_LINE}\r\n").as_bytes())
                .unwrap();
            line.clear();
            std::io::BufRead::read_line(&mut calls, &mut line).unwrap();
            let second = nonce_of(&line);
            guest
                .write_all(reply(&second, 0, "after").as_bytes())
                .unwrap();
            // The first call's reply, late (a shell that was not gone after all): noise.
            guest
                .write_all(reply(&first, 0, "late").as_bytes())
                .unwrap();
            (first, second)
        });
        let t = Instant::now();
        let e = b.exec("sleep 100", Duration::from_secs(100)).unwrap_err();
        assert!(matches!(e, BackdoorError::Restarted), "{e}");
        assert!(!e.is_bad_input());
        assert!(e.to_string().contains("restarted during the call"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let r = b.exec("true", Duration::from_secs(10)).unwrap();
        assert_eq!((r.status, r.stdout.as_slice()), (0, b"after".as_slice()));
        let (first, second) = guest_side.join().unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn a_guest_flooding_ready_lines_ends_each_call_and_breaks_nothing() {
        // A guest that prints the ready line in a loop: each call ends at the first one after
        // it was sent (none waits for its deadline), none leaves the backdoor broken, and once
        // the flood stops a call is answered.
        let (ours, mut guest) = UnixStream::pair().unwrap();
        guest
            .write_all(format!("{READY_LINE}\n").as_bytes())
            .unwrap();
        let b = Backdoor::wait_ready(ours, Duration::from_secs(5), &[], &mut |_| {}).unwrap();
        let flood: String = std::iter::repeat_n(format!("{READY_LINE}\n"), 500).collect();
        let guest_side = std::thread::spawn(move || {
            let mut calls = std::io::BufReader::new(guest.try_clone().unwrap());
            let mut line = String::new();
            for _ in 0..5 {
                line.clear();
                std::io::BufRead::read_line(&mut calls, &mut line).unwrap();
                // Ready lines, before the call's own reply could come.
                guest.write_all(flood.as_bytes()).unwrap();
            }
            line.clear();
            std::io::BufRead::read_line(&mut calls, &mut line).unwrap();
            guest
                .write_all(reply(&nonce_of(&line), 3, "quiet now").as_bytes())
                .unwrap();
        });
        let t = Instant::now();
        for _ in 0..5 {
            let e = b.exec("true", Duration::from_secs(100)).unwrap_err();
            assert!(matches!(e, BackdoorError::Restarted), "{e}");
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let r = b.exec("true", Duration::from_secs(10)).unwrap();
        assert_eq!(
            (r.status, r.stdout.as_slice()),
            (3, b"quiet now".as_slice())
        );
        guest_side.join().unwrap();
    }

    #[test]
    fn a_shell_that_never_becomes_ready_is_reported() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let e =
            Backdoor::wait_ready(ours, Duration::from_millis(200), &[], &mut |_| {}).unwrap_err();
        assert!(matches!(e, BackdoorError::NotReady(_)), "{e}");
        drop(theirs);
    }
}
