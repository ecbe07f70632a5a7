//! drydock's folders, files and sockets are its user's alone, whatever the umask, and drydock
//! never follows a link it did not make.
//!
//! - A folder drydock makes is 0700 ([`private_dir`], [`private_tree`]); one that exists already
//!   must be a directory of this user that neither group nor others can write, else it is
//!   refused (bad input, naming the folder and the fix), as ssh refuses loose key files: another
//!   local user who made `/tmp/drydock-0` first, or a state dir of theirs, would otherwise
//!   receive root's sockets and files.
//! - A file drydock writes whole goes through a temporary file in the same folder and a rename
//!   ([`write_atomic`]): a concurrent reader sees the old or the new file, never half of one, and
//!   a link planted under the file's name is replaced, not followed. Files drydock appends to or
//!   truncates are opened with `O_NOFOLLOW` ([`open_append_nofollow`], [`create_nofollow`]). All
//!   are 0600.
//! - A socket is bound inside such a folder and made 0600 ([`bind_listener`],
//!   [`bind_datagram`]).
//!
//! This is the one module of the workspace that makes drydock's folders, files and sockets; the
//! VM and cluster crates use it for everything they create.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::exitclass::{Classify, ExitClass};

/// The mode of every folder drydock makes.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file and socket drydock makes.
pub const FILE_MODE: u32 = 0o600;

/// Why a folder is not one drydock may use.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    #[error(
        "{} belongs to uid {owner}, not to this user (uid {uid}): drydock keeps its state and sockets only in folders of its own user (another user may have made this one to catch them); remove it, or point drydock elsewhere",
        path.display()
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "{} can be written by {who} (mode {mode:04o}): they could replace drydock's files or sockets in it; run `chmod go-w {}` (drydock makes its folders 0700)",
        path.display(), path.display()
    )]
    Loose {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error(
        "{} is a symbolic link: drydock does not follow links it did not make; remove it",
        path.display()
    )]
    Link { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot create or inspect {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for PrivateError {
    /// A folder of another user, one others can write, a link or not a folder is the caller's
    /// to fix (bad input); an I/O failure is a failure.
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::Io { .. } => ExitClass::Failed,
            Self::NotOwned { .. }
            | Self::Loose { .. }
            | Self::Link { .. }
            | Self::NotADirectory { .. } => ExitClass::BadInput,
        }
    }
}

impl PrivateError {
    /// `self.exit_class() == ExitClass::BadInput`, for drydock-vm's own `is_bad_input`s until
    /// they ask [`Classify`]; remove then.
    pub fn is_bad_input(&self) -> bool {
        self.exit_class() == ExitClass::BadInput
    }

    /// The folder named.
    pub fn path(&self) -> &Path {
        match self {
            Self::NotOwned { path, .. }
            | Self::Loose { path, .. }
            | Self::Link { path }
            | Self::NotADirectory { path }
            | Self::Io { path, .. } => path,
        }
    }
}

/// What is known of an existing folder, for [`judge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderFacts {
    pub is_link: bool,
    pub is_dir: bool,
    pub owner: u32,
    pub mode: u32,
}

impl FolderFacts {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            is_link: m.file_type().is_symlink(),
            is_dir: m.is_dir(),
            owner: m.uid(),
            mode: m.mode() & 0o7777,
        }
    }
}

/// Whether a folder with these facts may hold drydock's files for the user `uid` (pure).
pub fn judge(path: &Path, f: FolderFacts, uid: u32) -> Result<(), PrivateError> {
    let path = path.to_path_buf();
    if f.is_link {
        return Err(PrivateError::Link { path });
    }
    if !f.is_dir {
        return Err(PrivateError::NotADirectory { path });
    }
    if f.owner != uid {
        return Err(PrivateError::NotOwned {
            path,
            owner: f.owner,
            uid,
        });
    }
    let who = match (f.mode & 0o020 != 0, f.mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "every user",
        (true, true) => "its group and every user",
    };
    Err(PrivateError::Loose {
        path,
        mode: f.mode,
        who,
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PrivateError + '_ {
    move |source| PrivateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Check the folder `path` if it exists (a missing one passes: nothing in it can be read or
/// connected to). With `follow`, a link is followed and its target judged (a state dir the
/// user put elsewhere); without, a link is refused.
fn check(path: &Path, follow: bool) -> Result<bool, PrivateError> {
    let m = match follow {
        true => std::fs::metadata(path),
        false => std::fs::symlink_metadata(path),
    };
    match m {
        Ok(m) => judge(path, FolderFacts::of(&m), crate::sys::effective_uid()).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(path)(e)),
    }
}

/// Whether an existing folder `path` may hold drydock's files: this user's, not writable by
/// group or others, not a link. A missing folder passes. For clients that connect to sockets
/// or read files in it without creating anything.
pub fn check_private(path: &Path) -> Result<(), PrivateError> {
    check(path, false).map(|_| ())
}

/// Make the folder `path` (mode 0700, whatever the umask; its missing parents as ordinary
/// folders), or check the one that exists (see [`check_private`]; a link is refused).
pub fn private_dir(path: &Path) -> Result<(), PrivateError> {
    make(path, false)
}

fn make(path: &Path, follow: bool) -> Result<(), PrivateError> {
    if check(path, follow)? {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
    }
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {
            // The umask may have taken bits away (never added any): set the mode itself.
            std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE)).map_err(io(path))?;
        }
        // Made by someone else meanwhile: judged below like any existing folder.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(path)(e)),
    }
    check(path, false).map(|_| ())
}

/// [`private_dir`] for `top` and for each folder below it down to `path` (`path` must lie
/// under `top`, else only `path` is made). `top` is the root the user chose (a state dir): a
/// link there is followed and its target checked; every folder below it is drydock's own.
pub fn private_tree(top: &Path, path: &Path) -> Result<(), PrivateError> {
    let Ok(rest) = path.strip_prefix(top) else {
        return private_dir(path);
    };
    make(top, true)?;
    let mut p = top.to_path_buf();
    for c in rest.components() {
        p.push(c);
        private_dir(&p)?;
    }
    Ok(())
}

/// [`check_private`] for `top` (a link there is followed, as in [`private_tree`]) and for each
/// existing folder below it down to `path`; nothing is made. For clients about to connect to a
/// socket or read a file there.
pub fn check_private_tree(top: &Path, path: &Path) -> Result<(), PrivateError> {
    let Ok(rest) = path.strip_prefix(top) else {
        return check_private(path);
    };
    if !check(top, true)? {
        return Ok(());
    }
    let mut p = top.to_path_buf();
    for c in rest.components() {
        p.push(c);
        if !check(&p, false)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Options that open a file of drydock's own: mode 0600 when created, never through a link.
fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

/// A file's mode is 0600 whatever it was (a file an older drydock made under another umask).
fn tighten(f: File) -> std::io::Result<File> {
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Open `path` for appending (created 0600 if missing); a link there is an error (`ELOOP`),
/// never followed.
pub fn open_append_nofollow(path: &Path) -> std::io::Result<File> {
    tighten(options().append(true).create(true).open(path)?)
}

/// Open `path` for reading and writing (created 0600 if missing), keeping what it holds (a lock
/// file whose holder wrote who it is); a link there is an error (`ELOOP`), never followed.
pub fn open_nofollow(path: &Path) -> std::io::Result<File> {
    options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Create or truncate `path` (0600) for writing; a link there is an error (`ELOOP`), never
/// followed.
pub fn create_nofollow(path: &Path) -> std::io::Result<File> {
    tighten(
        options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?,
    )
}

/// A temporary name beside `path`, unique to this process and call (a dot file: editors'
/// watchers and `ls` leave it out).
fn temp_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}-{nanos:x}", std::process::id()))
}

/// Write `bytes` as the whole of `path`, atomically: a temporary file in the same folder
/// (0600, created anew, never through a link), then a rename over `path` (which replaces a
/// link there rather than following it). A concurrent reader sees the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_beside(path);
    let written = options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Remove what is at the socket path `path` if it is a socket (a stale one); anything else
/// there is left and makes the bind fail.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EEXIST)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Listen on the unix socket `path` (mode 0600), replacing a stale socket but nothing else.
/// Its folder must be private already ([`private_dir`]): the mode is set just after the bind.
pub fn bind_listener(path: &Path) -> std::io::Result<UnixListener> {
    remove_stale_socket(path)?;
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))?;
    Ok(l)
}

/// Bind the unix datagram socket `path` (mode 0600), as [`bind_listener`].
pub fn bind_datagram(path: &Path) -> std::io::Result<UnixDatagram> {
    remove_stale_socket(path)?;
    let s = UnixDatagram::bind(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn folders_are_judged_by_kind_owner_and_mode() {
        let f = |is_link, is_dir, owner, mode| FolderFacts {
            is_link,
            is_dir,
            owner,
            mode,
        };
        let p = Path::new("/tmp/drydock-0");
        // (facts, uid) → the error's kind, or none
        let cases: [(FolderFacts, u32, Option<&str>); 9] = [
            (f(false, true, 0, 0o700), 0, None),
            (f(false, true, 1000, 0o755), 1000, None),
            (f(false, true, 0, 0o1700), 0, None),
            (f(false, true, 1000, 0o700), 0, Some("belongs to uid 1000")),
            (
                f(false, true, 0, 0o777),
                0,
                Some("its group and every user"),
            ),
            (
                f(false, true, 0, 0o770),
                0,
                Some("by its group (mode 0770)"),
            ),
            (
                f(false, true, 0, 0o1757),
                0,
                Some("by every user (mode 1757)"),
            ),
            (f(true, false, 0, 0o777), 0, Some("is a symbolic link")),
            (f(false, false, 0, 0o600), 0, Some("is not a directory")),
        ];
        for (facts, uid, want) in cases {
            match (judge(p, facts, uid), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => {
                    let text = e.to_string();
                    assert!(text.contains(w), "{facts:?}: {text}");
                    assert!(text.starts_with("/tmp/drydock-0 "), "{text}");
                    assert!(e.is_bad_input());
                    assert_eq!(e.path(), p);
                }
                (r, w) => panic!("{facts:?} uid {uid}: {r:?}, wanted {w:?}"),
            }
        }
        let loose = judge(p, f(false, true, 0, 0o777), 0).unwrap_err();
        assert!(
            loose.to_string().contains("chmod go-w /tmp/drydock-0"),
            "{loose}"
        );
    }

    #[test]
    fn folders_are_made_0700_under_any_umask_and_existing_ones_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("state");
        let deep = top.join("vms/web");
        // The umask of this test process is whatever it is; the modes are set explicitly.
        private_tree(&top, &deep).unwrap();
        for p in [&top, &top.join("vms"), &deep] {
            assert_eq!(mode(p), 0o700, "{}", p.display());
        }
        // Made again: nothing changes, nothing fails.
        private_tree(&top, &deep).unwrap();
        std::fs::set_permissions(top.join("vms"), Permissions::from_mode(0o777)).unwrap();
        let e = private_tree(&top, &deep).unwrap_err();
        assert!(matches!(e, PrivateError::Loose { .. }), "{e}");
        assert_eq!(e.path(), top.join("vms"));
        assert!(e.is_bad_input());
        std::fs::set_permissions(top.join("vms"), Permissions::from_mode(0o755)).unwrap();
        private_tree(&top, &deep).unwrap();
        // A link below the top is refused; the top itself may be a link the user made.
        std::fs::remove_dir(&deep).unwrap();
        std::os::unix::fs::symlink(d.path(), &deep).unwrap();
        assert!(matches!(
            private_tree(&top, &deep),
            Err(PrivateError::Link { .. })
        ));
        let alias = d.path().join("alias");
        std::os::unix::fs::symlink(&top, &alias).unwrap();
        private_tree(&alias, &alias.join("clusters")).unwrap();
        assert_eq!(mode(&top.join("clusters")), 0o700);
        // check_private: a missing folder passes, a link does not (unless it is the top).
        check_private(&d.path().join("missing")).unwrap();
        assert!(check_private(&alias).is_err());
        check_private_tree(&alias, &alias.join("clusters/x/y")).unwrap();
        std::fs::set_permissions(top.join("clusters"), Permissions::from_mode(0o722)).unwrap();
        let e = check_private_tree(&alias, &alias.join("clusters/x")).unwrap_err();
        assert_eq!(e.path(), alias.join("clusters"));
    }

    #[test]
    fn atomic_writes_replace_links_instead_of_following_them() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let p = d.path().join("hosts");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(
            !std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(mode(&p), 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn concurrent_atomic_writes_never_show_half_a_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("build.nix");
        let (a, b) = (vec![b'a'; 1 << 20], vec![b'b'; 1 << 20]);
        write_atomic(&p, &a).unwrap();
        std::thread::scope(|s| {
            for bytes in [&a, &b] {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(p, bytes).unwrap();
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..200 {
                    let got = std::fs::read(&p).unwrap();
                    assert!(got == a || got == b, "a torn file of {} bytes", got.len());
                }
            });
        });
    }

    #[test]
    fn appends_and_truncations_refuse_links_and_make_0600_files() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = d.path().join("drydock.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_append_nofollow(&link).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        let e = create_nofollow(&link).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        let p = d.path().join("console.log");
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o666)).unwrap();
        let mut f = open_append_nofollow(&p).unwrap();
        f.write_all(b" more").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"old more");
        assert_eq!(mode(&p), 0o600);
        drop(create_nofollow(&p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"");
    }

    #[test]
    fn sockets_are_0600_and_replace_only_stale_sockets() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("exec.sock");
        drop(bind_listener(&p).unwrap());
        assert_eq!(mode(&p), 0o600);
        // A stale socket is replaced; a file of another kind is not.
        let _l = bind_listener(&p).unwrap();
        let q = d.path().join("vlan1.sock");
        std::fs::write(&q, b"not a socket").unwrap();
        assert!(bind_datagram(&q).is_err());
        assert_eq!(std::fs::read(&q).unwrap(), b"not a socket");
        std::fs::remove_file(&q).unwrap();
        let _s = bind_datagram(&q).unwrap();
        assert_eq!(mode(&q), 0o600);
    }
}
