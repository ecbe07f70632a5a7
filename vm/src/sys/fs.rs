//! File-system calls std lacks: extended attributes (for POSIX ACLs), `statvfs`, `memfd_create`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Read an extended attribute; `Ok(None)` when the file has none of that name.
pub(crate) fn getxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let p = cpath(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: `p` and `n` are NUL-terminated; `buf` is valid for `buf.len()` writable bytes.
    let len = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
        )
    };
    if len < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(err),
        };
    }
    buf.truncate(len as usize);
    Ok(Some(buf))
}

/// Size and free space of the file system holding `path`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsSpace {
    pub total: u64,
    pub available: u64,
}

/// `statvfs(2)` on `path`.
pub(crate) fn statvfs(path: &Path) -> io::Result<FsSpace> {
    let p = cpath(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `p` is NUL-terminated and `st` points to writable memory of the right type.
    let rc = unsafe { libc::statvfs(p.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok(FsSpace {
        total: st.f_blocks * frsize,
        available: st.f_bavail * frsize,
    })
}

/// `mknod(2)`: make `path` a character device node `major:minor` with permissions `mode`
/// (needs CAP_MKNOD), for tests that fake `/dev/kvm` without running the `mknod` program.
#[cfg(test)]
pub(crate) fn mknod_char(path: &Path, major: u32, minor: u32, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = cpath(path)?;
    // SAFETY: `p` is NUL-terminated; mknod only reads it.
    let rc = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, libc::makedev(major, minor)) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // As `mknod -m`: exactly `mode`, whatever the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Whether `memfd_create(2)` works here (QEMU's `memory-backend-memfd` needs it).
pub(crate) fn memfd_works() -> io::Result<()> {
    let name = c"drydock-doctor";
    // SAFETY: `name` is a NUL-terminated literal; the returned fd is checked and closed.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor we just created and own.
    unsafe {
        libc::close(fd);
    }
    Ok(())
}
