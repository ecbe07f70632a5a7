//! Reading files that drydock does not write itself, or that someone else may have replaced:
//! `.drv` files in the store, Nix's configuration, drydock's own state files. Only regular
//! files are read (checked on the open descriptor, so a FIFO cannot block the open and a link
//! to `/dev/zero` cannot be read for ever), links are followed only where a link is expected,
//! and every read has a size cap.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::exitclass::{Classify, ExitClass};

/// Caps for the kinds of files drydock reads.
pub const MAX_DRV_BYTES: u64 = 64 << 20;
/// Nix's configuration files (each one, includes separately).
pub const MAX_CONF_BYTES: u64 = 4 << 20;
/// drydock's own JSON state files (launch records, VM state, snapshot metadata).
pub const MAX_STATE_BYTES: u64 = 16 << 20;

/// Whether the last component of the path may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow it (Nix's configuration: `/etc/nix/nix.conf` is a link on NixOS).
    Follow,
    /// Refuse it (a store path or a state file that is a link is not what drydock wrote).
    Refuse,
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFileError {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is a symbolic link, not a regular file", path.display())]
    Link { path: PathBuf },
    #[error("{} is not a regular file (it is a {kind})", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
}

impl Classify for ReadFileError {
    /// A failure: whether a file that is a link, not regular or too large is the user's fault
    /// depends on what the file is for, so the caller that knows wraps it in its own error
    /// (`NixConfError` is bad input; so is drydock-vm's launch record).
    fn exit_class(&self) -> ExitClass {
        ExitClass::Failed
    }
}

impl ReadFileError {
    /// The file named.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::Link { path }
            | Self::NotRegular { path, .. }
            | Self::TooLarge { path, .. } => path,
        }
    }

    /// Whether the file does not exist (callers often treat that as "nothing recorded").
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Open `path` for reading if it is a regular file of at most `limit` bytes.
pub fn open_regular(path: &Path, links: Links, limit: u64) -> Result<File, ReadFileError> {
    let io = |source| ReadFileError::Io {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOFOLLOW: a link is refused
    // with ELOOP instead of being followed.
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if links == Links::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if links == Links::Refuse && e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadFileError::Link {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(ReadFileError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.len() > limit {
        return Err(ReadFileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(file)
}

/// Read a whole regular file of at most `limit` bytes (see [`open_regular`]).
pub fn read_regular(path: &Path, links: Links, limit: u64) -> Result<Vec<u8>, ReadFileError> {
    let file = open_regular(path, links, limit)?;
    let mut bytes = Vec::new();
    // The size was checked on the descriptor; a file that grows meanwhile is still cut.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ReadFileError::Io {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(ReadFileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// [`read_regular`] as UTF-8 text (invalid UTF-8 is an I/O error of kind `InvalidData`).
pub fn read_regular_text(path: &Path, links: Links, limit: u64) -> Result<String, ReadFileError> {
    let bytes = read_regular(path, links, limit)?;
    String::from_utf8(bytes).map_err(|e| ReadFileError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_others_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello").unwrap();
        assert_eq!(read_regular(&file, Links::Refuse, 5).unwrap(), b"hello");
        assert!(matches!(
            read_regular(&file, Links::Refuse, 4),
            Err(ReadFileError::TooLarge { limit: 4, .. })
        ));

        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read_regular(&link, Links::Refuse, 1 << 20),
            Err(ReadFileError::Link { .. })
        ));
        let e = read_regular(&link, Links::Follow, 1 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                ReadFileError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{e}"
        );

        let fifo = dir.path().join("fifo");
        crate::sys::make_fifo(&fifo).unwrap();
        // Would block in open() for ever without O_NONBLOCK.
        let e = read_regular(&fifo, Links::Follow, 1 << 20).unwrap_err();
        assert!(
            matches!(e, ReadFileError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("fifo"), "{e}");

        let e = read_regular(dir.path(), Links::Follow, 1 << 20).unwrap_err();
        assert!(matches!(
            e,
            ReadFileError::NotRegular {
                kind: "directory",
                ..
            }
        ));
        let e = read_regular(&dir.path().join("none"), Links::Follow, 1).unwrap_err();
        assert!(e.is_not_found());
    }
}
