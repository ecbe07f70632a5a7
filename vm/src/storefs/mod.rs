//! The store share: a vhost-user-fs server, built on virtiofsd as a library, that serves the Nix
//! store to the guest (tag `nix-store`) **read-only** and, by default, **closure-only**.
//!
//! It runs in its own process, a re-exec of the drydock binary with the hidden subcommand
//! `__store-server`, so it can sandbox itself (chroot, namespaces, capabilities, seccomp) without
//! touching the CLI. Two halves:
//!
//! - [`StoreServer`] (launcher side): starts that process through `spawn` (it dies with drydock,
//!   even on SIGKILL), passes the allow-list on its stdin, waits for its ready line, and stops it
//!   (SIGTERM, then SIGKILL) on [`StoreServer::stop`] or drop;
//! - [`serve_store`] (server side, `serve.rs`): binds the socket, sandboxes, serves one frontend
//!   and returns when it disconnects.
//!
//! The policies live in `closure.rs`: every write opcode answers `EROFS` whatever the guest
//! mounts, and with an allow-list the share's root shows only those store paths. Both the store's
//! server and a writable folder's migrate with their VM (`vm snapshot`, QEMU 8.2 or newer): the
//! store's state carries its closure view, which a restored server shows.
//!
//! Requests are handled on the request queue's own thread by default (thread pool size 0, also
//! virtiofsd's default): on a 2-core host the pool's hand-off costs more than the parallelism it
//! buys for the small, cache-friendly reads of a store closure. `--thread-pool-size` exists to
//! measure the other choice.

mod closure;
mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::spawn::{DEFAULT_GRACE, SpawnError, Supervised};

pub(crate) use serve::control_socket;
pub use serve::{READY_LINE, StoreServeOptions, parse_allow_list, serve_store};

/// The hidden subcommand that runs [`serve_store`].
pub const STORE_SERVER_SUBCOMMAND: &str = "__store-server";

/// How long [`StoreServer::spawn`] waits for the ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the store server could not start, run or stop.
#[derive(Debug, thiserror::Error)]
pub enum StoreServerError {
    /// The directory to share is missing or not a directory.
    #[error("shared directory {}", path.display())]
    SharedDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An allow-list entry is not a store path basename.
    #[error("allow-list entry {entry:?}: {reason}")]
    AllowEntry { entry: String, reason: &'static str },
    /// The allow-list could not be read.
    #[error("cannot read the allow-list")]
    AllowList(#[source] std::io::Error),
    /// The vhost-user socket could not be created.
    #[error("socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Raising the open-file limit failed.
    #[error("cannot raise the open-file limit: {0}")]
    Limits(String),
    /// Entering the chroot sandbox failed.
    #[error("cannot enter the sandbox")]
    Sandbox(#[source] virtiofsd::sandbox::Error),
    /// Dropping capabilities failed.
    #[error("cannot drop capabilities: {0}")]
    Capabilities(String),
    /// Installing the seccomp filter failed.
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] virtiofsd::seccomp::Error),
    /// Setting up the passthrough file system failed.
    #[error("cannot set up the shared file system")]
    Filesystem(#[source] std::io::Error),
    /// Building the vhost-user-fs backend failed.
    #[error("cannot build the vhost-user-fs backend")]
    Backend(#[source] virtiofsd::vhost_user::Error),
    /// The vhost-user daemon failed (its error type carries no source chain).
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// Telling the launcher "ready", or giving the server its allow-list, failed.
    #[error("cannot talk to the store server over its standard streams")]
    Ready(#[source] std::io::Error),
    /// Starting, awaiting or stopping the server process failed.
    #[error("store server process")]
    Process(#[source] SpawnError),
    /// The running server's control socket could not be reached or did not answer in time.
    #[error("cannot change the closure view through {}", path.display())]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The server refused the new allow-list (and kept the old one).
    #[error("the store server refused the new closure: {0}")]
    ControlRefused(String),
}

impl StoreServerError {
    /// True when the caller's input is at fault (missing shared directory, bad allow-list, a
    /// program that does not exist), not the host or the server.
    pub fn is_bad_input(&self) -> bool {
        match self {
            StoreServerError::SharedDir { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) || source.raw_os_error() == Some(libc::ENOTDIR)
            }
            StoreServerError::AllowEntry { .. } => true,
            StoreServerError::AllowList(source) => source.kind() == std::io::ErrorKind::NotFound,
            StoreServerError::Socket { source, .. } => {
                source.raw_os_error() == Some(libc::EEXIST)
                    || source.kind() == std::io::ErrorKind::NotFound
            }
            StoreServerError::Process(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// Replace the closure view of the running store server that listens on `socket` (a VM's
/// `fs.sock`): from now on the guest sees exactly `names` at the root of its store (new names at
/// once; see the `closure` module for names it already looked up). Returns how many names are
/// shown. Every step has the `deadline`.
pub fn update_closure(
    socket: &Path,
    names: &[String],
    deadline: std::time::Duration,
) -> Result<usize, StoreServerError> {
    use std::io::{BufRead, Write as _};
    let text = serve::encode_allow_list(names)?;
    let path = serve::control_socket(socket);
    let io_err = |source| StoreServerError::Control {
        path: path.clone(),
        source,
    };
    let mut conn = std::os::unix::net::UnixStream::connect(&path).map_err(io_err)?;
    conn.set_write_timeout(Some(deadline)).map_err(io_err)?;
    conn.set_read_timeout(Some(deadline)).map_err(io_err)?;
    conn.write_all(text.as_bytes()).map_err(io_err)?;
    conn.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    let mut reply = String::new();
    std::io::BufReader::new(&conn)
        .read_line(&mut reply)
        .map_err(io_err)?;
    let reply = reply.trim();
    match reply.strip_prefix("ok ").and_then(|n| n.parse().ok()) {
        Some(n) => Ok(n),
        None => Err(StoreServerError::ControlRefused(
            reply.strip_prefix("error: ").unwrap_or(reply).to_owned(),
        )),
    }
}

/// A running store server process, launched by [`StoreServer::spawn`]. Dropping it stops the
/// process (SIGTERM, then SIGKILL) and removes the socket.
#[derive(Debug)]
pub struct StoreServer {
    child: Supervised,
    socket: PathBuf,
}

impl StoreServer {
    /// Start `exe __store-server` serving `shared_dir` on `socket`, showing only `allow` at the
    /// root when given (store path basenames such as `abc…-hello-2.12`), and wait until it
    /// listens. `exe` is normally `std::env::current_exe()`.
    ///
    /// Call it from a thread that outlives the server (e.g. the main thread): the server gets
    /// SIGKILL when the *thread* that spawned it ends, which is how it dies with drydock.
    pub fn spawn(
        exe: &Path,
        socket: &Path,
        shared_dir: &Path,
        allow: Option<&[String]>,
    ) -> Result<Self, StoreServerError> {
        Self::spawn_as(exe, socket, shared_dir, allow, false)
    }

    /// A server of the folder `dir`, writable (a nixos-test node's `xchg` or `shared`), confined
    /// to it as the store's is.
    pub fn spawn_writable(exe: &Path, socket: &Path, dir: &Path) -> Result<Self, StoreServerError> {
        Self::spawn_as(exe, socket, dir, None, true)
    }

    fn spawn_as(
        exe: &Path,
        socket: &Path,
        shared_dir: &Path,
        allow: Option<&[String]>,
        writable: bool,
    ) -> Result<Self, StoreServerError> {
        let allow = allow.map(serve::encode_allow_list).transpose()?;
        let mut cmd = Command::new(exe);
        cmd.arg(STORE_SERVER_SUBCOMMAND)
            .arg("--socket")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared_dir);
        if writable {
            cmd.arg("--writable");
        }
        if allow.is_some() {
            cmd.arg("--allow-list").arg("-").stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child =
            Supervised::spawn("store server", cmd).map_err(StoreServerError::Process)?;
        if let Some(text) = &allow {
            let mut stdin = child
                .stdin()
                .ok_or_else(|| StoreServerError::Ready(std::io::ErrorKind::BrokenPipe.into()))?;
            // A write error means the server is gone; wait_ready below reports how it ended.
            if let Err(e) = stdin.write_all(text.as_bytes()) {
                tracing::debug!("writing the allow-list to the store server: {e}");
            }
        }
        child
            .wait_ready(READY_LINE, READY_TIMEOUT)
            .map_err(StoreServerError::Process)?;
        Ok(Self {
            child,
            socket: socket.to_owned(),
        })
    }

    /// The vhost-user socket the frontend (QEMU's `-chardev socket,path=…`) connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// How the server ended, if it has (it exits by itself when its frontend disconnects).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, StoreServerError> {
        self.child.try_wait().map_err(StoreServerError::Process)
    }

    /// Stop the server (SIGTERM, then SIGKILL after `grace`), remove its socket, and return how
    /// it ended.
    pub fn stop_within(mut self, grace: Duration) -> Result<ExitStatus, StoreServerError> {
        let status = self.child.stop(grace).map_err(StoreServerError::Process);
        self.remove_socket();
        status
    }

    /// [`StoreServer::stop_within`] with the default grace period.
    pub fn stop(self) -> Result<ExitStatus, StoreServerError> {
        self.stop_within(DEFAULT_GRACE)
    }

    /// Remove the vhost-user socket and the control socket.
    fn remove_socket(&self) {
        for path in [self.socket.clone(), serve::control_socket(&self.socket)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("removing {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Err(e) = self.child.stop(DEFAULT_GRACE) {
            tracing::warn!("stopping the store server: {e}");
        }
        self.remove_socket();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_allow_entry_is_refused_before_spawning() {
        let err = StoreServer::spawn(
            Path::new("/nonexistent/drydock"),
            Path::new("/tmp/x.sock"),
            Path::new("/nix/store"),
            Some(&["ok-name".to_owned(), "../escape".to_owned()]),
        )
        .unwrap_err();
        assert!(matches!(err, StoreServerError::AllowEntry { .. }), "{err}");
        assert!(err.is_bad_input());
    }

    #[test]
    fn missing_program_is_bad_input() {
        let err = StoreServer::spawn(
            Path::new("/nonexistent/drydock"),
            Path::new("/tmp/x.sock"),
            Path::new("/nix/store"),
            None,
        )
        .unwrap_err();
        assert!(err.is_bad_input(), "{err}");
    }
}
