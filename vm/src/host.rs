//! The one layer through which drydock's checks read the system (the doctor, the accelerator
//! choice of a launch, cgroup placement). It takes a root directory, so unit tests point it at
//! fixture trees (`proc/`, `sys/`, `etc/`, `dev/`) instead of `/`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// The system as the checks see it: everything below `root`.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

/// The kind of a file as far as device checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    CharDevice,
    BlockDevice,
    Directory,
    Regular,
    Other,
}

/// What `stat` says about a (device) file, plus its POSIX access ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileInfo {
    pub kind: FileKind,
    pub major: u32,
    pub minor: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub acl: Option<Vec<AclEntry>>,
}

/// One entry of a POSIX access ACL (`system.posix_acl_access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AclEntry {
    pub tag: AclTag,
    /// rwx bits (4, 2, 1).
    pub perm: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AclTag {
    UserObj,
    User(u32),
    GroupObj,
    Group(u32),
    Mask,
    Other,
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
pub(crate) fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n / 1024),
        _ => None,
    }
}

/// The credentials of a process, as `/proc/PID/status` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Creds {
    pub euid: u32,
    pub egid: u32,
    /// The *effective* supplementary groups of the process (not what /etc/group says now).
    pub groups: Vec<u32>,
}

/// A line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// A line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Host {
    /// The real system.
    pub fn system() -> Self {
        Self::at("/")
    }

    /// A system rooted at `root` (a fixture tree in tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Whether this is the real system (probes that act on the kernel only run there).
    pub fn is_real(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The root directory every system path is joined under.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The physical path of an absolute system path.
    pub(crate) fn path(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    pub(crate) fn read(&self, p: impl AsRef<Path>) -> io::Result<String> {
        std::fs::read_to_string(self.path(p))
    }

    pub(crate) fn exists(&self, p: impl AsRef<Path>) -> bool {
        self.path(p).symlink_metadata().is_ok()
    }

    pub(crate) fn read_dir_names(&self, p: impl AsRef<Path>) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(p))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// `stat` (following links, as `open` does) and the access ACL.
    pub(crate) fn file_info(&self, p: impl AsRef<Path>) -> io::Result<FileInfo> {
        let path = self.path(p);
        let meta = std::fs::metadata(&path)?;
        let ft = meta.file_type();
        let kind = if ft.is_char_device() {
            FileKind::CharDevice
        } else if ft.is_block_device() {
            FileKind::BlockDevice
        } else if ft.is_dir() {
            FileKind::Directory
        } else if ft.is_file() {
            FileKind::Regular
        } else {
            FileKind::Other
        };
        let rdev = meta.rdev();
        let acl = sys::fs::getxattr(&path, "system.posix_acl_access")
            .ok()
            .flatten()
            .and_then(|raw| parse_acl(&raw));
        Ok(FileInfo {
            kind,
            major: libc::major(rdev),
            minor: libc::minor(rdev),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            acl,
        })
    }

    /// Really open a file read-write, as QEMU opens `/dev/kvm`.
    pub(crate) fn open_rw(&self, p: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path(p))
    }

    /// Free and total space of the file system holding `p` (or its nearest existing ancestor).
    pub(crate) fn space(&self, p: impl AsRef<Path>) -> io::Result<(PathBuf, sys::fs::FsSpace)> {
        let mut cur = self.path(p);
        loop {
            if cur.exists() {
                return sys::fs::statvfs(&cur).map(|s| (cur, s));
            }
            if !cur.pop() {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
        }
    }

    /// Credentials of this process, read from `proc/self/status` under the root.
    /// The host's memory (`MemTotal`), in MiB, if `/proc/meminfo` says.
    pub(crate) fn memory_mib(&self) -> Option<u64> {
        parse_mem_total_mib(&self.read("proc/meminfo").ok()?)
    }

    pub(crate) fn creds(&self) -> io::Result<Creds> {
        parse_status(&self.read("/proc/self/status")?)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Uid/Gid in status"))
    }

    pub(crate) fn groups(&self) -> Vec<Group> {
        self.read("/etc/group")
            .map(|s| parse_groups(&s))
            .unwrap_or_default()
    }

    pub(crate) fn users(&self) -> Vec<User> {
        self.read("/etc/passwd")
            .map(|s| parse_passwd(&s))
            .unwrap_or_default()
    }
}

/// The binary format of `system.posix_acl_access`: a u32 version (2), then 8-byte entries of
/// (u16 tag, u16 perm, u32 id), little endian.
pub(crate) fn parse_acl(raw: &[u8]) -> Option<Vec<AclEntry>> {
    if raw.len() < 4 || u32::from_le_bytes(raw[0..4].try_into().ok()?) != 2 {
        return None;
    }
    let mut out = Vec::new();
    for chunk in raw[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([chunk[0], chunk[1]]);
        let perm = u32::from(u16::from_le_bytes([chunk[2], chunk[3]]));
        let id = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        let tag = match tag {
            0x01 => AclTag::UserObj,
            0x02 => AclTag::User(id),
            0x04 => AclTag::GroupObj,
            0x08 => AclTag::Group(id),
            0x10 => AclTag::Mask,
            0x20 => AclTag::Other,
            _ => return None,
        };
        out.push(AclEntry { tag, perm });
    }
    Some(out)
}

pub(crate) fn parse_status(status: &str) -> Option<Creds> {
    let field = |name: &str| -> Option<Vec<u32>> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(
            line[name.len()..]
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect(),
        )
    };
    let uid = field("Uid:")?;
    let gid = field("Gid:")?;
    Some(Creds {
        euid: *uid.get(1).or(uid.first())?,
        egid: *gid.get(1).or(gid.first())?,
        groups: field("Groups:").unwrap_or_default(),
    })
}

pub(crate) fn parse_groups(text: &str) -> Vec<Group> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Group {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

pub(crate) fn parse_passwd(text: &str) -> Vec<User> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(User {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_takes_effective_ids_and_groups() {
        let s =
            "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t100\t101\t100\t100\nGroups:\t4 24 27 \n";
        let c = parse_status(s).unwrap();
        assert_eq!(c.euid, 1001);
        assert_eq!(c.egid, 101);
        assert_eq!(c.groups, vec![4, 24, 27]);
        let empty = parse_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(empty.groups.is_empty());
        assert!(parse_status("Name: x\n").is_none());
    }

    #[test]
    fn mem_total_in_mib() {
        for (text, want) in [
            ("MemTotal:       24450412 kB\nMemFree: 1 kB\n", Some(23877)),
            ("MemFree: 1 kB\nMemTotal: 1048576 kB\n", Some(1024)),
            ("MemTotal: 12 MB\n", None),
            ("MemTotal: lots kB\n", None),
            ("", None),
        ] {
            assert_eq!(parse_mem_total_mib(text), want, "{text:?}");
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("proc")).unwrap();
        std::fs::write(d.path().join("proc/meminfo"), "MemTotal: 2097152 kB\n").unwrap();
        assert_eq!(Host::at(d.path()).memory_mib(), Some(2048));
        assert_eq!(Host::at(d.path().join("none")).memory_mib(), None);
    }

    #[test]
    fn group_and_passwd_lines() {
        let g = parse_groups("root:x:0:\nkvm:x:994:alice,bob\n# c\nbad\n");
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].members, vec!["alice", "bob"]);
        let u = parse_passwd("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/a:/bin/sh\n");
        assert_eq!(u[1].uid, 1000);
    }

    #[test]
    fn acl_binary_format() {
        let mut raw = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (8, 6, 994),
            (4, 0, u32::MAX),
            (16, 6, u32::MAX),
            (32, 0, u32::MAX),
        ] {
            raw.extend(tag.to_le_bytes());
            raw.extend(perm.to_le_bytes());
            raw.extend(id.to_le_bytes());
        }
        let acl = parse_acl(&raw).unwrap();
        assert_eq!(
            acl[1],
            AclEntry {
                tag: AclTag::Group(994),
                perm: 6
            }
        );
        assert_eq!(acl.len(), 5);
        assert!(parse_acl(&[1, 0, 0, 0]).is_none());
        assert!(parse_acl(&[]).is_none());
    }

    #[test]
    fn paths_are_joined_under_the_root() {
        let h = Host::at("/tmp/fixture");
        assert_eq!(h.path("/dev/kvm"), PathBuf::from("/tmp/fixture/dev/kvm"));
        assert!(!h.is_real());
        assert!(Host::system().is_real());
    }
}
