//! [`StoreFs`]: the `FileSystem` the store server hands to virtiofsd's FUSE server. It wraps
//! virtiofsd's `PassthroughFsRo` and delegates every method to it, with two policies on top:
//!
//! - **read-only, twice**: every operation that could modify the share (`setattr`, `symlink`,
//!   `mknod`, `mkdir`, `unlink`, `rmdir`, `rename`/`rename2`, `link`, `create`, `write`,
//!   `fallocate`, `setxattr`, `removexattr`, `copy_file_range`, `tmpfile`, `open`/`access` for
//!   writing) answers `EROFS` here without reaching the inner file system, which itself refuses
//!   the same set. The guest's mount flags play no part.
//! - **closure-only**: with an allow-list of store path basenames, the *root* directory of the
//!   share shows only those entries (plus `.` and `..`): `readdir`/`readdirplus` skip the others
//!   and `lookup` of another name is `ENOENT`. Below a store path nothing is filtered. A FUSE
//!   request can only name an inode the server handed out by a lookup, so filtering lookups at the
//!   root is enough; names containing `/` (never sent by a real kernel) are refused with `EINVAL`
//!   at every level so a crafted request cannot walk past the root filter.
//!
//! - **live**: the allow-list can be replaced while the guest runs (hot reload: a new system's
//!   closure becomes visible at once). Nothing stale survives in the guest: a hidden name's lookup
//!   answers a plain `ENOENT`, which the kernel does not cache as a negative entry, and the
//!   filtered root is opened without `FOPEN_CACHE_DIR`/`FOPEN_KEEP_CACHE`, so every listing is
//!   read anew. (A name that was visible and is hidden afterwards stays reachable through a dentry
//!   the guest already holds, until it expires: virtio-fs has no invalidation messages.)
//!
//! - **migrates**: for `vm snapshot` and `vm restore` (QEMU's vhost-user-fs device state, QEMU
//!   8.2 or newer), the state is a small header holding the closure view (see [`write_view`]),
//!   then passthrough's own state (the inodes and open handles the guest holds, found again by
//!   path on the other side). A restored server takes its view from the stream, so the guest
//!   sees what it saw when it was saved; a hot reload afterwards replaces it as usual.
//!
//! Why a wrapper: `PassthroughFsRo` cannot filter, and the `FileSystem` trait is the seam virtiofsd
//! offers; filtering at the root inode keeps the rest of passthrough's behaviour (inode and handle
//! tracking, `readdirplus` via `lookup`) intact.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use virtiofsd::filesystem::{
    Context, DirEntry, DirectoryIterator, Entry, Extensions, FileSystem, FsOptions, GetxattrReply,
    ListxattrReply, OpenOptions, SerializableFileSystem, SetattrValid, SetxattrFlags,
    ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;
use virtiofsd::passthrough::read_only::PassthroughFsRo;

type Inner = PassthroughFsRo;
type Inode = <Inner as FileSystem>::Inode;
type Handle = <Inner as FileSystem>::Handle;

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

/// The set of root entries a closure-only share shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct AllowList(HashSet<Vec<u8>>);

impl AllowList {
    pub(crate) fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(names: I) -> Self {
        Self(
            names
                .into_iter()
                .map(|s| s.as_ref().as_bytes().to_vec())
                .collect(),
        )
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    fn shows(&self, name: &[u8]) -> bool {
        name == b"." || name == b".." || self.0.contains(name)
    }

    /// The names, sorted (the list was made of strings, so each is UTF-8).
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.sort();
        names
    }
}

/// An allow-list shared between the file system and whoever replaces it (the control socket).
pub(crate) type SharedAllowList = Arc<RwLock<AllowList>>;

/// Read-only, optionally closure-filtered passthrough file system. See the module docs.
pub(crate) struct StoreFs {
    inner: Inner,
    allow: Option<SharedAllowList>,
}

impl StoreFs {
    pub(crate) fn new(inner: Inner, allow: Option<SharedAllowList>) -> Self {
        Self { inner, allow }
    }

    /// The current allow-list (a poisoned lock still holds the last complete list).
    fn allowed(&self) -> Option<std::sync::RwLockReadGuard<'_, AllowList>> {
        self.allow
            .as_ref()
            .map(|a| a.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// `Err(ENOENT)` if `name` in `parent` is hidden by the allow-list; `Err(EINVAL)` for names
    /// that are not a single path component.
    fn check_name(&self, parent: Inode, name: &CStr) -> io::Result<()> {
        let bytes = name.to_bytes();
        if bytes.contains(&b'/') {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        match self.allowed() {
            Some(allow) if parent == fuse::ROOT_ID && !allow.shows(bytes) => Err(enoent()),
            _ => Ok(()),
        }
    }

    fn filtered_root_readdir(
        &self,
        allow: &AllowList,
        ctx: Context,
        handle: Handle,
        size: u32,
        mut offset: u64,
    ) -> io::Result<StoreDirIter> {
        // One inner batch may hold only hidden names; an empty reply would tell the kernel the
        // directory has ended, so keep reading until something is shown or the inner listing ends.
        loop {
            let mut batch = self
                .inner
                .readdir(ctx, fuse::ROOT_ID, handle, size, offset)?;
            let mut seen_any = false;
            let mut shown = Vec::new();
            while let Some(entry) = batch.next() {
                seen_any = true;
                offset = entry.offset;
                if allow.shows(entry.name.to_bytes()) {
                    shown.push(OwnedDirEntry::from(&entry));
                }
            }
            if !shown.is_empty() || !seen_any {
                return Ok(StoreDirIter::Filtered {
                    entries: shown,
                    next: 0,
                });
            }
        }
    }
}

pub(crate) struct OwnedDirEntry {
    ino: libc::ino64_t,
    offset: u64,
    type_: u32,
    name: CString,
}

impl From<&DirEntry<'_>> for OwnedDirEntry {
    fn from(e: &DirEntry<'_>) -> Self {
        Self {
            ino: e.ino,
            offset: e.offset,
            type_: e.type_,
            name: e.name.to_owned(),
        }
    }
}

/// Directory listing: passthrough's own below the root, a filtered copy at a filtered root.
pub(crate) enum StoreDirIter {
    Inner(<Inner as FileSystem>::DirIter),
    Filtered {
        entries: Vec<OwnedDirEntry>,
        next: usize,
    },
}

impl DirectoryIterator for StoreDirIter {
    fn next(&mut self) -> Option<DirEntry<'_>> {
        match self {
            StoreDirIter::Inner(it) => it.next(),
            StoreDirIter::Filtered { entries, next } => {
                let e = entries.get(*next)?;
                *next += 1;
                Some(DirEntry {
                    ino: e.ino,
                    offset: e.offset,
                    type_: e.type_,
                    name: &e.name,
                })
            }
        }
    }
}

impl FileSystem for StoreFs {
    type Inode = Inode;
    type Handle = Handle;
    type DirIter = StoreDirIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // Never offer write-back caching: there is nothing to write back.
        self.inner
            .init(capable)
            .map(|opts| opts - FsOptions::WRITEBACK_CACHE)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        self.check_name(parent, name)?;
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(fuse::Attr, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        _ctx: Context,
        _inode: Inode,
        _attr: fuse::SetattrIn,
        _handle: Option<Handle>,
        _valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        Err(erofs())
    }

    fn readlink(&self, ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        _ctx: Context,
        _linkname: &CStr,
        _parent: Inode,
        _name: &CStr,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn mknod(
        &self,
        _ctx: Context,
        _parent: Inode,
        _name: &CStr,
        _mode: u32,
        _rdev: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn mkdir(
        &self,
        _ctx: Context,
        _parent: Inode,
        _name: &CStr,
        _mode: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn unlink(&self, _ctx: Context, _parent: Inode, _name: &CStr) -> io::Result<()> {
        Err(erofs())
    }

    fn rmdir(&self, _ctx: Context, _parent: Inode, _name: &CStr) -> io::Result<()> {
        Err(erofs())
    }

    fn rename(
        &self,
        _ctx: Context,
        _olddir: Inode,
        _oldname: &CStr,
        _newdir: Inode,
        _newname: &CStr,
        _flags: u32,
    ) -> io::Result<()> {
        Err(erofs())
    }

    fn link(
        &self,
        _ctx: Context,
        _inode: Inode,
        _newparent: Inode,
        _newname: &CStr,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn open(
        &self,
        ctx: Context,
        inode: Inode,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        let cflags = flags as libc::c_int;
        if cflags & libc::O_PATH == 0
            && (cflags & libc::O_ACCMODE != libc::O_RDONLY || cflags & libc::O_TRUNC != 0)
        {
            return Err(erofs());
        }
        self.inner.open(ctx, inode, kill_priv, flags)
    }

    fn create(
        &self,
        _ctx: Context,
        _parent: Inode,
        _name: &CStr,
        _mode: u32,
        _kill_priv: bool,
        _flags: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions)> {
        // The kernel sends CREATE only after a negative lookup, so nothing is lost by refusing it
        // outright (an existing file is opened with OPEN).
        Err(erofs())
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        w: W,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write<R: ZeroCopyReader>(
        &self,
        _ctx: Context,
        _inode: Inode,
        _handle: Handle,
        _r: R,
        _size: u32,
        _offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _kill_priv: bool,
        _flags: u32,
    ) -> io::Result<usize> {
        Err(erofs())
    }

    fn flush(&self, ctx: Context, inode: Inode, handle: Handle, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        _ctx: Context,
        _inode: Inode,
        _handle: Handle,
        _mode: u32,
        _offset: u64,
        _length: u64,
    ) -> io::Result<()> {
        Err(erofs())
    }

    fn release(
        &self,
        ctx: Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: Context, inode: Inode) -> io::Result<libc::statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        _ctx: Context,
        _inode: Inode,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
        _extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        Err(erofs())
    }

    fn getxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, _ctx: Context, _inode: Inode, _name: &CStr) -> io::Result<()> {
        Err(erofs())
    }

    fn opendir(
        &self,
        ctx: Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        let (handle, opts) = self.inner.opendir(ctx, inode, flags)?;
        if self.allow.is_some() && inode == fuse::ROOT_ID {
            // The filtered root's listing changes with the allow-list: never cached.
            return Ok((
                handle,
                opts - OpenOptions::CACHE_DIR - OpenOptions::KEEP_CACHE,
            ));
        }
        Ok((handle, opts))
    }

    fn readdir(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
    ) -> io::Result<StoreDirIter> {
        match self.allowed() {
            Some(allow) if inode == fuse::ROOT_ID && size > 0 => {
                self.filtered_root_readdir(&allow, ctx, handle, size, offset)
            }
            _ => self
                .inner
                .readdir(ctx, inode, handle, size, offset)
                .map(StoreDirIter::Inner),
        }
    }

    fn fsyncdir(
        &self,
        ctx: Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: Context, inode: Inode, flags: u32, handle: Handle) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            return Err(erofs());
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn copyfilerange(
        &self,
        _ctx: Context,
        _inode_in: Inode,
        _handle_in: Handle,
        _offset_in: u64,
        _inode_out: Inode,
        _handle_out: Handle,
        _offset_out: u64,
        _len: u64,
        _flags: u64,
    ) -> io::Result<usize> {
        Err(erofs())
    }

    fn syncfs(&self, ctx: Context, inode: Inode) -> io::Result<()> {
        self.inner.syncfs(ctx, inode)
    }

    fn tmpfile(&self) -> io::Result<(Entry, Option<Handle>, OpenOptions)> {
        Err(erofs())
    }
}

/// What a migration stream of the store server starts with: these bytes, then the format's
/// version (`u32`, little-endian), the view (`u8`: 0 the whole store, 1 a closure), the length
/// of the list in bytes (`u64`, little-endian; 0 for the whole store) and the list itself (one
/// store path basename per line, sorted), then passthrough's own state to the end of the stream.
const VIEW_MAGIC: &[u8; 16] = b"drydock-storefs\n";
const VIEW_VERSION: u32 = 1;
const VIEW_WHOLE: u8 = 0;
const VIEW_CLOSURE: u8 = 1;
const VIEW_HEADER_LEN: usize = VIEW_MAGIC.len() + 4 + 1 + 8;
/// The largest list a stream may carry: as large as the control socket takes.
const MAX_VIEW_BYTES: u64 = super::serve::MAX_CONTROL_BYTES;

fn bad_state(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the store server's saved state {what}"),
    )
}

/// Write the closure view (`None`: the whole store) as the header of a migration stream.
pub(crate) fn write_view(out: &mut impl Write, names: Option<&[String]>) -> io::Result<()> {
    let (view, list) = match names {
        None => (VIEW_WHOLE, String::new()),
        Some(names) => (
            VIEW_CLOSURE,
            super::serve::encode_allow_list(names).map_err(|e| bad_state(e.to_string()))?,
        ),
    };
    if list.len() as u64 > MAX_VIEW_BYTES {
        return Err(bad_state(format!(
            "would hold a closure of {} bytes, more than {MAX_VIEW_BYTES}",
            list.len()
        )));
    }
    let mut header = Vec::with_capacity(VIEW_HEADER_LEN + list.len());
    header.extend_from_slice(VIEW_MAGIC);
    header.extend_from_slice(&VIEW_VERSION.to_le_bytes());
    header.push(view);
    header.extend_from_slice(&(list.len() as u64).to_le_bytes());
    header.extend_from_slice(list.as_bytes());
    out.write_all(&header)
}

/// Read the header [`write_view`] wrote, exactly (not a byte of what follows), and check it:
/// the closure view it holds (`None`: the whole store). Nothing in it is trusted: a wrong magic
/// or version, a list longer than [`MAX_VIEW_BYTES`], a truncated one, or an entry that is not a
/// store path basename is an `InvalidData` error saying so.
pub(crate) fn read_view(input: &mut impl Read) -> io::Result<Option<Vec<String>>> {
    let mut header = [0u8; VIEW_HEADER_LEN];
    input.read_exact(&mut header).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad_state("is truncated: it ends within its header"),
        _ => e,
    })?;
    let (magic, rest) = header.split_at(VIEW_MAGIC.len());
    if magic != VIEW_MAGIC {
        return Err(bad_state("does not start with drydock's header"));
    }
    let (version, rest) = rest.split_at(4);
    let version = u32::from_le_bytes(version.try_into().expect("4 bytes"));
    if version != VIEW_VERSION {
        return Err(bad_state(format!(
            "has version {version} of drydock's header; this drydock reads version {VIEW_VERSION}"
        )));
    }
    let (view, len) = (rest[0], &rest[1..]);
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if len > MAX_VIEW_BYTES {
        return Err(bad_state(format!(
            "claims a closure of {len} bytes, more than {MAX_VIEW_BYTES}"
        )));
    }
    match view {
        VIEW_WHOLE if len == 0 => return Ok(None),
        VIEW_WHOLE => return Err(bad_state("shares the whole store but carries a list")),
        VIEW_CLOSURE => {}
        other => return Err(bad_state(format!("has an unknown view {other}"))),
    }
    let mut list = Vec::new();
    input.take(len).read_to_end(&mut list)?;
    if list.len() as u64 != len {
        return Err(bad_state(format!(
            "is truncated: its closure has {} of {len} bytes",
            list.len()
        )));
    }
    let text = String::from_utf8(list).map_err(|_| bad_state("has a closure that is not UTF-8"))?;
    super::serve::parse_allow_list(&text)
        .map(Some)
        .map_err(|e| bad_state(format!("has a bad closure: {e}")))
}

/// Migration (`vm snapshot`, `vm restore`): the closure view, then passthrough's state (see the
/// module docs). A restored server shows the view the stream carries.
impl SerializableFileSystem for StoreFs {
    fn prepare_serialization(&self, cancel: std::sync::Arc<AtomicBool>) {
        self.inner.prepare_serialization(cancel)
    }

    fn serialize(&self, mut state_pipe: File) -> io::Result<()> {
        let names = self.allowed().map(|a| a.names());
        write_view(&mut state_pipe, names.as_deref())?;
        self.inner.serialize(state_pipe)
    }

    fn deserialize_and_apply(&self, mut state_pipe: File) -> io::Result<()> {
        // Read exactly the header: the rest of the pipe is passthrough's.
        let view = read_view(&mut state_pipe)?;
        match (&view, &self.allow) {
            (Some(_), None) => {
                return Err(bad_state(
                    "shows a closure, but this server shares the whole store",
                ));
            }
            (None, Some(_)) => {
                return Err(bad_state(
                    "shares the whole store, but this server shows a closure",
                ));
            }
            _ => {}
        }
        self.inner.deserialize_and_apply(state_pipe)?;
        if let (Some(names), Some(allow)) = (view, &self.allow) {
            let list = AllowList::new(&names);
            tracing::info!("closure view restored: {} store paths shown", list.len());
            *allow.write().unwrap_or_else(|p| p.into_inner()) = list;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_shows_dot_entries_and_listed_names_only() {
        let allow = AllowList::new(["abc-foo", "def-bar"]);
        assert_eq!(allow.len(), 2);
        assert!(allow.shows(b"."));
        assert!(allow.shows(b".."));
        assert!(allow.shows(b"abc-foo"));
        assert!(!allow.shows(b"abc-fo"));
        assert!(!allow.shows(b"xyz-baz"));
        assert!(!allow.shows(b""));
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_view_round_trips_and_is_read_exactly() {
        for view in [None, Some(names(&["abc-foo", "def-bar"])), Some(Vec::new())] {
            let mut stream = Vec::new();
            write_view(&mut stream, view.as_deref()).unwrap();
            // What follows the header is passthrough's, and stays unread.
            stream.extend_from_slice(b"INNER STATE");
            let mut r = &stream[..];
            assert_eq!(read_view(&mut r).unwrap(), view);
            assert_eq!(r, b"INNER STATE");
        }
        // The list of a live allow-list is sorted.
        let allow = AllowList::new(["b-2", "a-1"]);
        assert_eq!(allow.names(), names(&["a-1", "b-2"]));
    }

    fn header(magic: &[u8], version: u32, view: u8, len: u64, list: &[u8]) -> Vec<u8> {
        let mut h = magic.to_vec();
        h.extend_from_slice(&version.to_le_bytes());
        h.push(view);
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(list);
        h
    }

    #[test]
    fn a_bad_view_is_an_error_saying_why() {
        let list = b"abc-foo\ndef-bar\n";
        let good = header(VIEW_MAGIC, 1, 1, list.len() as u64, list);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "ends within its header"),
            (good[..10].to_vec(), "ends within its header"),
            (good[..VIEW_HEADER_LEN + 3].to_vec(), "has 3 of 16 bytes"),
            (
                header(b"something-else!\n", 1, 1, 0, b""),
                "does not start with drydock's header",
            ),
            (header(VIEW_MAGIC, 2, 1, 0, b""), "has version 2"),
            (header(VIEW_MAGIC, 1, 7, 0, b""), "unknown view 7"),
            (header(VIEW_MAGIC, 1, 0, 3, b"a-b"), "carries a list"),
            (
                header(VIEW_MAGIC, 1, 1, u64::MAX, b""),
                "more than 134217728",
            ),
            (
                header(VIEW_MAGIC, 1, 1, MAX_VIEW_BYTES + 1, b"abc"),
                "more than 134217728",
            ),
            (header(VIEW_MAGIC, 1, 1, 9, b"abc/../x\n"), "contains '/'"),
            (
                header(VIEW_MAGIC, 1, 1, 3, b"..\n"),
                "not a store path name",
            ),
            (header(VIEW_MAGIC, 1, 1, 2, b"\xff\n"), "not UTF-8"),
        ];
        for (bytes, says) in cases {
            let e = read_view(&mut &bytes[..]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{says}: {e}");
            assert!(
                e.to_string().starts_with("the store server's saved state ")
                    && e.to_string().contains(says),
                "{says}: {e}"
            );
        }
        // A bad name is refused on the way out too.
        let e = write_view(&mut Vec::new(), Some(&names(&["ok", "a/b"]))).unwrap_err();
        assert!(e.to_string().contains("contains '/'"), "{e}");
    }
}
