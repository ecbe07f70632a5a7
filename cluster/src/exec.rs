//! `exec` and `shell` on a cluster's machines: the per-machine exec server in the owner (one JSON
//! request line, one reply line, or an interactive session on the same connection), and the
//! client side other drydock processes call.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use drydock_gc::{Cancel, Deadline};
use serde::{Deserialize, Serialize};

use crate::backdoor::{Backdoor, BackdoorError, ExecOutput};
use crate::command::{GuestCommand, MAX_STDIN, tty_script, tty_status_file, with_stdin};
use crate::state::{ClusterError, exec_socket, machine_failure};
use drydock_vm::{VmPaths, WakeFd, error_chain as error_text, wait_readable};
use std::io::BufReader;

/// How serving a machine's exec socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServeEnd {
    /// The owner stopped the machine.
    Stopped,
    QemuExited,
    /// The machine's store server died: the guest cannot reach its store any more.
    ServerDied,
}

/// Serve `exec` calls to `machine` on `exec` until `stop` fires, QEMU exits or the store server
/// dies (blocking on all of them at once): one thread per call, queueing on the backdoor, each
/// added to `calls` (the caller joins them once the VM is stopped; finished ones are joined
/// here as new calls come).
pub(crate) fn serve(
    machine: &str,
    backdoor: &Arc<Backdoor>,
    exec: &UnixListener,
    stop: &WakeFd,
    vm: &drydock_vm::Vm,
    calls: &mut Vec<std::thread::JoinHandle<()>>,
) -> std::io::Result<ServeEnd> {
    let prompt = format!("{}# ", machine);
    loop {
        let mut fds = vec![exec.as_fd(), stop.as_fd()];
        let qemu = vm.qemu_exit().map(|w| {
            fds.push(w.as_fd());
            fds.len() - 1
        });
        let server = vm.server_exit().map(|w| {
            fds.push(w.as_fd());
            fds.len() - 1
        });
        let ready = wait_readable(&fds, None)?;
        if ready[1] {
            return Ok(ServeEnd::Stopped);
        }
        if qemu.is_some_and(|i| ready[i]) {
            return Ok(ServeEnd::QemuExited);
        }
        if server.is_some_and(|i| ready[i]) {
            return Ok(ServeEnd::ServerDied);
        }
        if !ready[0] {
            continue;
        }
        match exec.accept() {
            Ok((s, _)) => {
                let (b, prompt) = (backdoor.clone(), prompt.clone());
                let t = std::thread::Builder::new()
                    .name(format!("exec-{}", machine))
                    .spawn(move || answer(s, &b, &prompt))?;
                let (done, running): (Vec<_>, Vec<_>) = std::mem::take(calls)
                    .into_iter()
                    .partition(|t| t.is_finished());
                for t in done {
                    let _ = t.join();
                }
                *calls = running;
                calls.push(t);
            }
            Err(e) if drydock_vm::retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// An `exec` request on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct ExecRequest {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    timeout_ms: u64,
    /// An interactive session instead of a call: after one reply line (`error` unset), the
    /// connection carries the session's bytes both ways until it ends.
    #[serde(default)]
    shell: bool,
    /// A session's terminal size (rows, columns), for the guest's line editing.
    #[serde(default)]
    size: Option<(u16, u16)>,
    /// How many bytes of the command's stdin follow the request line (at most
    /// [`MAX_STDIN`]).
    #[serde(default)]
    stdin_bytes: u64,
}

/// An `exec` reply on the wire (outputs base64).
#[derive(Debug, Serialize, Deserialize)]
struct ExecReply {
    #[serde(default)]
    status: i32,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    error: Option<String>,
    /// The call failed because the guest's backdoor restarted under it
    /// ([`BackdoorError::Restarted`]): the caller may call again (the new shell is ready).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    restarted: bool,
}

fn send_reply(s: &UnixStream, reply: &ExecReply) {
    let _ = crate::wire::write_json_line(s, reply);
}

fn answer(s: UnixStream, b: &Backdoor, prompt: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = crate::wire::read_line_unbuffered(&s)
        .map_err(|e| e.to_string())
        .and_then(|line| serde_json::from_slice::<ExecRequest>(&line).map_err(|e| e.to_string()));
    if let Ok(ExecRequest { shell: true, .. }) = &req {
        let _ = s.set_read_timeout(None);
        let reply = |error: Option<String>| ExecReply {
            status: 0,
            stdout: String::new(),
            stderr: String::new(),
            error,
            restarted: false,
        };
        let (size, cmd) = match &req {
            Ok(r) => (r.size, r.cmd.as_str()),
            Err(_) => (None, ""),
        };
        let mut started = || send_reply(&s, &reply(None));
        let ran = if cmd.is_empty() {
            b.shell(&s, prompt, size, &mut started)
        } else {
            b.run_tty(&s, cmd, size, &mut started)
        };
        if let Err(e) = ran {
            tracing::warn!("shell session: {}", error_text(&e));
            send_reply(&s, &reply(Some(error_text(&e))));
        }
        return;
    }
    let req = req.and_then(|req| {
        let stdin = read_stdin(&s, req.stdin_bytes)?;
        Ok((with_stdin(&req.cmd, &stdin), req.timeout_ms))
    });
    let reply = match req {
        // A caller that goes away (Ctrl-C, killed) has its command killed in the guest.
        Ok((cmd, timeout_ms)) => {
            match b.exec_for(&cmd, Duration::from_millis(timeout_ms), Some(&s)) {
                Ok(o) => ExecReply {
                    status: o.status,
                    stdout: B64.encode(&o.stdout),
                    stderr: B64.encode(&o.stderr),
                    error: None,
                    restarted: false,
                },
                Err(e) => ExecReply {
                    status: 1,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: Some(error_text(&e)),
                    restarted: matches!(e, BackdoorError::Restarted),
                },
            }
        }
        Err(e) => ExecReply {
            status: 2,
            stdout: String::new(),
            stderr: String::new(),
            error: Some(format!("bad request: {e}")),
            restarted: false,
        },
    };
    send_reply(&s, &reply);
}

/// The `n` bytes of stdin that follow a request line.
fn read_stdin(s: &UnixStream, n: u64) -> Result<Vec<u8>, String> {
    if n > MAX_STDIN as u64 {
        return Err(format!(
            "stdin of {n} bytes; at most {} MiB",
            MAX_STDIN >> 20
        ));
    }
    let mut bytes = vec![0; n as usize];
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    (&mut &*s)
        .read_exact(&mut bytes)
        .map_err(|e| format!("reading stdin: {e}"))?;
    Ok(bytes)
}

/// How a `shell` session runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShellOptions {
    /// The terminal's size (rows, columns), passed to the guest.
    pub size: Option<(u16, u16)>,
    /// `~.` at the start of a line leaves the session (`~~` sends one `~`), as in ssh: for a
    /// terminal in raw mode, where Ctrl-C is a byte for the guest.
    pub escape: bool,
}

/// How long the call that fetches `exec -t`'s status may take.
const TTY_STATUS: Duration = Duration::from_secs(30);

/// `exec -t`: run `cmd` in the VM `vm` as a session (see [`shell_remote`]) and return its exit
/// status, which a second call fetches.
pub fn exec_tty(
    vm: &str,
    paths: &VmPaths,
    cmd: &GuestCommand,
    opts: ShellOptions,
    input: impl Read + Send + 'static,
    output: &mut dyn Write,
    cancel: Option<&Cancel>,
) -> Result<i32, ClusterError> {
    // A name no other guest process can guess (as the backdoor's markers): the status is the
    // command's, not one planted there first.
    let token = crate::backdoor::nonce().map_err(|e| ClusterError::Remote {
        vm: vm.to_string(),
        message: drydock_vm::error_chain(&e),
    })?;
    let status_file = tty_status_file(&token);
    session_remote(
        vm,
        paths,
        &tty_script(&cmd.script(), &status_file),
        opts,
        input,
        output,
        cancel,
    )?;
    if cancel.is_some_and(Cancel::is_set) {
        return Err(ClusterError::Interrupted);
    }
    let f = crate::backdoor::sh_quote(&status_file);
    let o = exec_remote(
        vm,
        paths,
        &format!("cat {f} && rm -f {f}"),
        TTY_STATUS,
        cancel,
    )?;
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .map_err(|_| ClusterError::Remote {
            vm: vm.to_string(),
            message: "the command's exit status was not found after its session".into(),
        })
}

/// The `~.` escape of [`ShellOptions::escape`], as a state machine over the input bytes.
#[derive(Debug, Clone, Copy)]
pub struct Escape {
    at_line_start: bool,
    tilde: bool,
}

impl Default for Escape {
    fn default() -> Self {
        Self {
            at_line_start: true,
            tilde: false,
        }
    }
}

impl Escape {
    /// The bytes of `input` to send on, and whether the escape was typed (nothing after it is
    /// sent).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.at_line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.at_line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.at_line_start = matches!(b, b'\r' | b'\n');
        }
        (out, false)
    }
}

/// An interactive root shell in the VM `vm` through its owner: `input` goes to the guest's
/// shell, what it prints to `output`, until it exits (`exit`, or `input` ends, or the escape).
pub fn shell_remote(
    vm: &str,
    paths: &VmPaths,
    opts: ShellOptions,
    input: impl Read + Send + 'static,
    output: &mut dyn Write,
    cancel: Option<&Cancel>,
) -> Result<(), ClusterError> {
    session_remote(vm, paths, "", opts, input, output, cancel)
}

/// A session that runs `script`, or an interactive shell when it is empty.
fn session_remote(
    vm: &str,
    paths: &VmPaths,
    script: &str,
    opts: ShellOptions,
    input: impl Read + Send + 'static,
    output: &mut dyn Write,
    cancel: Option<&Cancel>,
) -> Result<(), ClusterError> {
    let call = call_error(vm);
    let req = ExecRequest {
        cmd: script.to_string(),
        timeout_ms: 0,
        shell: true,
        size: opts.size,
        stdin_bytes: 0,
    };
    // The owner answers once the session started (or why it could not); calls queue before it.
    let (mut s, _) = ask_owner(vm, paths, &req, &[], None, cancel)?;
    let mut to_guest = s.get_ref().try_clone().map_err(&call)?;
    // An interruption (SIGTERM; Ctrl-C is a key for the guest on a raw terminal) ends the
    // session: the connection is shut, the owner ends the session's shell.
    let shut = s.get_ref().try_clone().map_err(&call)?;
    let _interrupt = cancel.map(|c| {
        c.on_cancel(move || {
            let _ = shut.shutdown(std::net::Shutdown::Both);
        })
    });
    // The input thread may block on a terminal after the session ended; it is left to the
    // process's exit then, never joined.
    std::thread::Builder::new()
        .name("shell-stdin".into())
        .spawn(move || {
            let mut input = input;
            let mut escape = Escape::default();
            let mut buf = [0u8; 4096];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let (bytes, leave) = if opts.escape {
                    escape.feed(&buf[..n])
                } else {
                    (buf[..n].to_vec(), false)
                };
                if to_guest.write_all(&bytes).is_err() || leave {
                    break;
                }
            }
            let _ = to_guest.shutdown(std::net::Shutdown::Write);
        })
        .map_err(&call)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) if cancel.is_some_and(Cancel::is_set) => return Err(ClusterError::Interrupted),
            Ok(0) => return Ok(()),
            Ok(n) => {
                output.write_all(&buf[..n]).map_err(&call)?;
                output.flush().map_err(&call)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(call(e)),
        }
    }
}

fn call_error(vm: &str) -> impl Fn(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Call {
        vm: vm.to_string(),
        source,
    }
}

/// Send `req` (and the bytes `after` it) to the owner of the VM `vm` on its exec socket and
/// read the reply line (within `read_timeout`, if any): the reply, unless it carries an error,
/// and the connection, buffered, for whatever follows it. A machine that is not there says why,
/// if it failed.
fn ask_owner(
    vm: &str,
    paths: &VmPaths,
    req: &ExecRequest,
    after: &[u8],
    read_timeout: Option<Duration>,
    cancel: Option<&Cancel>,
) -> Result<(BufReader<UnixStream>, ExecReply), ClusterError> {
    // The socket's folders must be this user's alone: another user's folder at the same place
    // could hold a socket of theirs that takes the command and forges its reply.
    paths.check_private().map_err(ClusterError::NotPrivate)?;
    let s = UnixStream::connect(exec_socket(paths)).map_err(|_| match machine_failure(paths) {
        Some(why) => ClusterError::Failed {
            vm: vm.to_string(),
            why,
        },
        None => ClusterError::NoExec(vm.to_string()),
    })?;
    let call = call_error(vm);
    s.set_read_timeout(read_timeout).map_err(&call)?;
    // An interruption shuts the connection: the read below ends, and the owner, seeing it
    // closed, kills the command in the guest.
    let shut = s.try_clone().map_err(&call)?;
    let _interrupt = cancel.map(|c| {
        c.on_cancel(move || {
            let _ = shut.shutdown(std::net::Shutdown::Both);
        })
    });
    crate::wire::write_json_line(&s, req).map_err(&call)?;
    (&mut &s).write_all(after).map_err(&call)?;
    let mut r = BufReader::new(s);
    let reply: Result<ExecReply, _> = crate::wire::read_json_line(&mut r);
    if cancel.is_some_and(Cancel::is_set) {
        return Err(ClusterError::Interrupted);
    }
    let reply = reply.map_err(|e| match machine_failure(paths) {
        // The machine failed under the call (its reply may not have made it).
        Some(why) => ClusterError::Failed {
            vm: vm.to_string(),
            why,
        },
        None => call(e),
    })?;
    if reply.restarted {
        return Err(ClusterError::Restarted { vm: vm.to_string() });
    }
    if let Some(message) = reply.error {
        return Err(ClusterError::Remote {
            vm: vm.to_string(),
            message,
        });
    }
    Ok((r, reply))
}

/// Run the shell command line `cmd` in the VM `vm` (its folder `paths`) through its owner's
/// exec socket, with no stdin. `cancel` (Ctrl-C, SIGTERM) ends the call at once with
/// [`ClusterError::Interrupted`]; the command is killed in the guest.
pub fn exec_remote(
    vm: &str,
    paths: &VmPaths,
    cmd: &str,
    timeout: Duration,
    cancel: Option<&Cancel>,
) -> Result<ExecOutput, ClusterError> {
    exec_in(
        vm,
        paths,
        &GuestCommand::Line(cmd.to_string()),
        &[],
        timeout,
        cancel,
    )
}

/// Run `cmd` in the VM `vm` (its folder `paths`) through its owner's exec socket, with `stdin`
/// (at most [`MAX_STDIN`] bytes) as its standard input; at `timeout` it is killed (status 124),
/// and on `cancel` too (the call ends with [`ClusterError::Interrupted`]).
pub fn exec_in(
    vm: &str,
    paths: &VmPaths,
    cmd: &GuestCommand,
    stdin: &[u8],
    timeout: Duration,
    cancel: Option<&Cancel>,
) -> Result<ExecOutput, ClusterError> {
    if stdin.len() > MAX_STDIN {
        return Err(ClusterError::StdinTooLarge {
            bytes: stdin.len() as u64,
            max: MAX_STDIN as u64,
        });
    }
    let req = ExecRequest {
        cmd: cmd.script(),
        timeout_ms: timeout.as_millis() as u64,
        shell: false,
        size: None,
        stdin_bytes: stdin.len() as u64,
    };
    // The owner's deadline is the call's; ours adds its grace for the reply.
    let deadline = Deadline::after(timeout + Duration::from_secs(30));
    let (_, reply) = ask_owner(vm, paths, &req, stdin, deadline.timeout(), cancel)?;
    let call = call_error(vm);
    let dec = |s: &str| B64.decode(s).map_err(|e| call(std::io::Error::other(e)));
    Ok(ExecOutput {
        status: reply.status,
        stdout: dec(&reply.stdout)?,
        stderr: dec(&reply.stderr)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_escape_is_tilde_dot_at_a_line_start() {
        let cases: [(&[&str], &str, bool); 8] = [
            (&["ls\r"], "ls\r", false),
            (&["~."], "", true),
            (&["ls\r~.rest"], "ls\r", true),
            (&["ls\n~", ".x"], "ls\n", true),
            (&["a~.b"], "a~.b", false),
            (&["~~.\r"], "~.\r", false),
            (&["~x"], "~x", false),
            (&["\r~", "~", "\r~."], "\r~\r", true),
        ];
        for (inputs, want, want_leave) in cases {
            let mut e = Escape::default();
            let (mut got, mut left) = (Vec::new(), false);
            for i in inputs {
                let (b, l) = e.feed(i.as_bytes());
                got.extend(b);
                if l {
                    left = true;
                    break;
                }
            }
            assert_eq!(
                (String::from_utf8(got).unwrap(), left),
                (want.to_string(), want_leave),
                "{inputs:?}"
            );
        }
    }
}
