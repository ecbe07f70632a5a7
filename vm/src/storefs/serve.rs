//! The store server's own process (`drydock __store-server`): bind the vhost-user socket, lock
//! the process down, say "ready" on stdout, serve exactly one frontend, and return when it
//! disconnects.
//!
//! Sandbox, when running as root (the default for drydock's VM runs):
//! - new network and IPC namespaces (the server needs neither; the already bound unix socket keeps
//!   working, since path-named sockets are reached through the file system);
//! - `chroot` into the shared directory (virtiofsd's own chroot sandbox, which also keeps
//!   `/proc/self/fd` open for re-opening inodes and drops supplementary groups);
//! - every capability dropped except `CAP_DAC_READ_SEARCH` (read any file; no write override, no
//!   `CAP_SYS_CHROOT`/`CAP_SYS_ADMIN` to undo the chroot);
//! - `PR_SET_NO_NEW_PRIVS`, then virtiofsd's seccomp allow-list (kill the process on anything
//!   else).
//!
//! As a non-root user only no-new-privs and seccomp apply (chroot needs privilege, and a user
//! namespace would remap file owners to `nobody`); the read-only and closure policies do not
//! depend on the sandbox at all.
//!
//! Both kinds of server migrate (`vm snapshot`/`vm restore` of a virtio-fs VM): the store's
//! through `StoreFs` (its closure view travels in the stream), a writable folder's as plain
//! passthrough state; inodes are found again by path (see `serve_store`).
//!
//! The process also asks for SIGKILL when its parent dies (the launcher sets this before exec as
//! well), and keeps SIGTERM's default action: SIGTERM ends it at once, which is a clean stop since
//! it holds no state worth saving.

use std::io::Read;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use virtiofsd::passthrough::read_only::PassthroughFsRo;
use virtiofsd::passthrough::{self, CachePolicy, InodeFileHandlesMode, MigrationMode};
use virtiofsd::sandbox::{Sandbox, SandboxMode};
use virtiofsd::seccomp::{SeccompAction, enable_seccomp};
use virtiofsd::vhost_user::VhostUserFsBackendBuilder;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::StoreServerError;
use super::closure::{AllowList, SharedAllowList, StoreFs};
use crate::sys::proc as sysproc;

/// What the server prints, alone on a line on stdout, once it accepts a connection.
pub const READY_LINE: &str = "drydock-store-server ready";

/// File descriptors kept back from the guest's quota for the server itself (memory regions,
/// sockets, eventfds, threads), as virtiofsd does.
const INTERNAL_FD_RESERVE: u64 = 1024;

/// How long the guest may cache entries and attributes. A valid store path never changes, so
/// everything can be cached for a day (like virtiofsd's `cache=always`). A whole-store share
/// gains entries at its root as paths are built: a name the guest has not looked up yet is
/// always asked for (the server sends no negative entries), so new paths still appear; a
/// collected path fails on open.
const CACHE_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Everything the server process needs to know.
#[derive(Debug, Clone)]
pub struct StoreServeOptions {
    /// Where to listen for the vhost-user frontend (QEMU). A stale socket there is replaced.
    pub socket: PathBuf,
    /// The directory to share: the physical store (`ROOT/nix/store` or `/nix/store`).
    pub shared_dir: PathBuf,
    /// Store path basenames to show at the root; `None` shares everything.
    pub allow: Option<Vec<String>>,
    /// Worker threads for FUSE requests; 0 handles them on the queue's own thread.
    pub thread_pool_size: usize,
    /// Apply the sandbox (namespaces, chroot, capabilities, seccomp). Only for debugging off.
    pub sandbox: bool,
    /// Serve `shared_dir` writable (a folder of the guest's, never a store): no allow-list.
    pub writable: bool,
}

impl StoreServeOptions {
    /// Options with the defaults: full sandbox, no thread pool.
    pub fn new(socket: PathBuf, shared_dir: PathBuf, allow: Option<Vec<String>>) -> Self {
        Self {
            socket,
            shared_dir,
            allow,
            thread_pool_size: 0,
            sandbox: true,
            writable: false,
        }
    }
}

/// Check one allow-list entry: a single, non-empty path component without NUL or newline.
pub(crate) fn check_allow_entry(entry: &str) -> Result<(), StoreServerError> {
    let reason = if entry.is_empty() {
        Some("empty")
    } else if entry == "." || entry == ".." {
        Some("not a store path name")
    } else if entry.contains('/') {
        Some("contains '/'")
    } else if entry.contains('\0') || entry.contains('\n') {
        Some("contains NUL or newline")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreServerError::AllowEntry {
            entry: entry.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// An allow-list's text, each entry checked: one basename per line (what [`parse_allow_list`]
/// reads back).
pub(crate) fn encode_allow_list(names: &[String]) -> Result<String, StoreServerError> {
    let mut text = String::new();
    for n in names {
        check_allow_entry(n)?;
        text.push_str(n);
        text.push('\n');
    }
    Ok(text)
}

/// Parse an allow-list file's text: one basename per line; blank lines are ignored.
pub fn parse_allow_list(text: &str) -> Result<Vec<String>, StoreServerError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        check_allow_entry(line)?;
        out.push(line.to_owned());
    }
    Ok(out)
}

/// Run the store server in this process until the frontend disconnects. Meant for the hidden
/// subcommand only: it chroots and drops capabilities for good.
pub fn serve_store(opts: &StoreServeOptions) -> Result<(), StoreServerError> {
    if let Err(e) = sysproc::set_parent_death_signal(libc::SIGKILL) {
        tracing::warn!("cannot ask for SIGKILL on parent death: {e}");
    }
    let shared =
        std::fs::canonicalize(&opts.shared_dir).map_err(|source| StoreServerError::SharedDir {
            path: opts.shared_dir.clone(),
            source,
        })?;
    if !shared.is_dir() {
        return Err(StoreServerError::SharedDir {
            path: opts.shared_dir.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let allow = match &opts.allow {
        Some(names) => {
            for n in names {
                check_allow_entry(n)?;
            }
            Some(AllowList::new(names))
        }
        None => None,
    };

    let listener = bind_socket(&opts.socket)?;
    // A closure share can be changed while it runs: its control socket, bound before the sandbox
    // like the vhost-user socket.
    let control = match &allow {
        Some(_) => Some(bind_socket(&control_socket(&opts.socket))?),
        None => None,
    };
    // Passthrough keeps an O_PATH descriptor per inode the guest knows: raise the soft limit as
    // far as the hard limit allows (virtiofsd's own default asks for 1M and warns when it cannot).
    let wanted = nofile_hard_limit().map(|hard| hard.min(DEFAULT_NOFILE));
    let fd_limit =
        virtiofsd::limits::setup_rlimit_nofile(wanted).map_err(StoreServerError::Limits)?;
    let guest_fd_limit =
        fd_limit.saturating_sub(INTERNAL_FD_RESERVE + opts.thread_pool_size as u64);

    let is_root = sysproc::effective_uid() == 0;
    let confine = opts.sandbox && is_root;
    if confine {
        if let Err(e) = sysproc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC) {
            tracing::warn!("cannot enter new network/IPC namespaces: {e}");
        }
    } else if opts.sandbox {
        tracing::info!("not root: no chroot, no capability changes; seccomp only");
    }
    let shared_str = shared
        .to_str()
        .ok_or_else(|| StoreServerError::SharedDir {
            path: shared.clone(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?
        .to_owned();
    let mode = if confine {
        SandboxMode::Chroot
    } else {
        SandboxMode::None
    };
    let mut sandbox = Sandbox::new(shared_str, mode, Vec::new(), Vec::new());
    let mountinfo_prefix = sandbox
        .get_mountinfo_prefix()
        .map_err(StoreServerError::Filesystem)?;
    let listener = sandbox
        .enter(Listener::from(listener))
        .map_err(StoreServerError::Sandbox)?;

    let cfg = passthrough::Config {
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        cache_policy: CachePolicy::Always,
        root_dir: sandbox.get_root_dir(),
        mountinfo_prefix,
        proc_sfd_rawfd: sandbox.get_proc_self_fd(),
        proc_mountinfo_rawfd: sandbox.get_mountinfo_fd(),
        inode_file_handles: InodeFileHandlesMode::Never,
        readdirplus: true,
        writeback: false,
        xattr: false,
        announce_submounts: false,
        guest_fd_limit,
        // Migration (snapshots) finds each inode the guest holds again by its path: the store
        // never changes under a path, and a path is found by reading /proc/self/fd's links,
        // which works in the chroot (opened before it; the links then read relative to the new
        // root, `/HASH-name/...`, as the root inode's own link `/` is) and without privilege.
        // File handles would need open_by_handle_at, so CAP_DAC_READ_SEARCH, which a server run
        // by another user than root does not have. The same holds for a writable share.
        migration_mode: MigrationMode::FindPaths,
        ..Default::default()
    };

    if confine {
        drop_capabilities()?;
    }
    if opts.sandbox {
        sysproc::set_no_new_privs().map_err(StoreServerError::Filesystem)?;
        // Must come before any thread is started: the filter applies to this thread and its
        // future children only.
        enable_seccomp(SeccompAction::Kill, false).map_err(StoreServerError::Seccomp)?;
    }

    let shown = allow.as_ref().map(AllowList::len);
    let allow = allow.map(|a| Arc::new(RwLock::new(a)));
    if let (Some(listener), Some(allow)) = (control, &allow) {
        let allow = Arc::clone(allow);
        std::thread::Builder::new()
            .name("store-control".into())
            .spawn(move || serve_control(&listener, &allow))
            .map_err(StoreServerError::Filesystem)?;
    }
    if opts.writable {
        // A writable folder of the guest's (a nixos-test node's `xchg`, `shared`): plain
        // passthrough, confined to the folder like the store (chroot as root; `openat2` with
        // `RESOLVE_IN_ROOT` either way, so neither `..` nor a link the guest made leads out).
        let fs = passthrough::PassthroughFs::new(cfg).map_err(StoreServerError::Filesystem)?;
        return run_daemon(fs, opts, listener, &shared, None, confine);
    }
    let fs = StoreFs::new(
        PassthroughFsRo::new(cfg).map_err(StoreServerError::Filesystem)?,
        allow,
    );
    run_daemon(fs, opts, listener, &shared, shown, confine)
}

/// Serve `fs` to the one frontend that connects to `listener`, until it disconnects.
fn run_daemon<F>(
    fs: F,
    opts: &StoreServeOptions,
    mut listener: Listener,
    shared: &Path,
    shown: Option<usize>,
    confine: bool,
) -> Result<(), StoreServerError>
where
    F: virtiofsd::filesystem::FileSystem
        + virtiofsd::filesystem::SerializableFileSystem
        + Send
        + Sync
        + 'static,
{
    let backend = Arc::new(
        VhostUserFsBackendBuilder::default()
            .set_thread_pool_size(opts.thread_pool_size)
            .build(fs)
            .map_err(StoreServerError::Backend)?,
    );
    let mut daemon = VhostUserDaemon::new(
        "drydock-store".to_owned(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::<BitmapMmapRegion>::new()),
    )
    .map_err(|e| StoreServerError::Daemon(e.to_string()))?;

    say_ready()?;
    tracing::info!(
        shared = %shared.display(),
        closure_entries = ?shown,
        writable = opts.writable,
        sandboxed = confine,
        "store server waiting for its frontend"
    );
    daemon
        .start(&mut listener)
        .map_err(|e| StoreServerError::Daemon(e.to_string()))?;
    // One VM, one connection: stop listening so a second connect fails fast.
    drop(listener);
    tracing::debug!("frontend connected");
    let result = daemon.wait();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => {
            tracing::info!("frontend disconnected; store server exiting");
            Ok(())
        }
        Err(e) => Err(StoreServerError::Daemon(e.to_string())),
    }
}

/// The control socket of the store server listening on `socket`: `SOCKET.ctl`.
pub(crate) fn control_socket(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// The largest allow-list a control connection may send (a closure of a million paths).
pub(crate) const MAX_CONTROL_BYTES: u64 = 128 << 20;

/// Serve the control socket: each connection sends a whole new allow-list (one basename per
/// line, then end of stream) and gets one line back, `ok N` (N entries now shown) or `error:
/// WHY` (the list is then unchanged). The socket is mode 0600: only the VM's owner reaches it.
fn serve_control(listener: &UnixListener, allow: &SharedAllowList) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // As a `File`: read(2)/write(2), which the seccomp filter allows (a socket's own
        // recv/send are recvfrom/sendto, which it does not: the process would be killed).
        let mut conn = std::fs::File::from(std::os::fd::OwnedFd::from(conn));
        let mut text = String::new();
        let reply = match (&mut conn)
            .take(MAX_CONTROL_BYTES + 1)
            .read_to_string(&mut text)
        {
            Err(e) => format!("error: reading the allow-list: {e}"),
            Ok(n) if n as u64 > MAX_CONTROL_BYTES => {
                format!("error: the allow-list is larger than {MAX_CONTROL_BYTES} bytes")
            }
            Ok(_) => match parse_allow_list(&text) {
                Ok(names) => {
                    let list = AllowList::new(&names);
                    let n = list.len();
                    *allow.write().unwrap_or_else(|p| p.into_inner()) = list;
                    tracing::info!("closure view replaced: {n} store paths shown");
                    format!("ok {n}")
                }
                Err(e) => format!("error: {e}"),
            },
        };
        let _ = writeln!(conn, "{reply}");
    }
}

/// The open-file limit the server asks for when the hard limit allows it.
const DEFAULT_NOFILE: u64 = 1_000_000;

/// The hard `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn nofile_hard_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let _soft = fields.next()?;
    fields.next()?.parse().ok()
}

/// Bind the listening socket (mode 0600), replacing a stale socket but nothing else.
fn bind_socket(path: &Path) -> Result<UnixListener, StoreServerError> {
    drydock_gc::bind_listener(path).map_err(|source| StoreServerError::Socket {
        path: path.to_owned(),
        source,
    })
}

fn drop_capabilities() -> Result<(), StoreServerError> {
    let fail = |what: &str, e: capng::Error| StoreServerError::Capabilities(format!("{what}: {e}"));
    capng::clear(capng::Set::BOTH);
    capng::updatev(
        capng::Action::ADD,
        capng::Type::PERMITTED | capng::Type::EFFECTIVE,
        vec!["DAC_READ_SEARCH"],
    )
    .map_err(|e| fail("select", e))?;
    capng::apply(capng::Set::BOTH).map_err(|e| fail("apply", e))
}

fn say_ready() -> Result<(), StoreServerError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY_LINE}")
        .and_then(|()| out.flush())
        .map_err(StoreServerError::Ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_must_be_single_components() {
        for bad in ["", ".", "..", "a/b", "/abc", "a\nb", "a\0b"] {
            let err = check_allow_entry(bad).expect_err(bad);
            assert!(err.is_bad_input(), "{bad:?}: {err}");
        }
        check_allow_entry("0a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p-hello-2.12").unwrap();
    }

    #[test]
    fn allow_list_file_is_one_name_per_line() {
        let list = parse_allow_list("abc-foo\n\n  def-bar  \n").unwrap();
        assert_eq!(list, vec!["abc-foo".to_owned(), "def-bar".to_owned()]);
        assert!(parse_allow_list("abc-foo\n../etc\n").is_err());
    }

    #[test]
    fn hard_nofile_limit_is_read_from_proc() {
        let hard = nofile_hard_limit().expect("a numeric hard limit");
        assert!(hard >= 64, "{hard}");
    }

    #[test]
    fn bind_replaces_a_stale_socket_but_not_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        drop(bind_socket(&sock).unwrap());
        // The first listener is gone; its file remains and is replaced.
        let l = bind_socket(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(l);

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind_socket(&file).unwrap_err();
        assert!(matches!(err, StoreServerError::Socket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
