//! Sends that never block (`sendto(2)`/`send(2)` with `MSG_DONTWAIT`), which std does not
//! offer: a hub must drop a frame for a port whose queue is full rather than stall every port,
//! and a capture tap whose reader is slow loses frames rather than stalling the hub.
//! (Waits on descriptors are `drydock_vm::wait_readable`.)

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;

/// Send `buf` from `sock` to the unix socket `to` without blocking.
pub(crate) fn send_to_nowait(sock: &UnixDatagram, buf: &[u8], to: &Path) -> io::Result<usize> {
    let bytes = to.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: the fd is a live socket borrowed from `sock`; `buf` is valid for `buf.len()` bytes
    // of reading; `addr` is an initialised sockaddr_un whose first `len` bytes (family, path and
    // its NUL, within the struct) are the address, as sendto(2) requires.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            (&raw const addr).cast(),
            len as libc::socklen_t,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Write as much of `buf` to the stream `sock` as fits now, without blocking and without
/// SIGPIPE (a reader that is gone is an error, `EPIPE`).
pub(crate) fn send_nowait(sock: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the fd is a live socket borrowed from `sock`; `buf` is valid for `buf.len()` bytes
    // of reading.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
