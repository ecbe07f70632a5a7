//! QEMU's version as its `--version` first line states it (`QEMU emulator version 10.0.2
//! (Debian 1:10.0.2+ds-2~bpo12+1)`), and what a version can do that older ones cannot: migrate
//! (snapshot) a `vhost-user-fs` (virtio-fs) device, which QEMU can since 8.2 (the back-end's state
//! travels through `VHOST_USER_PROTOCOL_F_DEVICE_STATE`; 7.2 marks the device unmigratable).
//! Pure: the caller asks QEMU (`snapshot::qemu_version`, doctor's cached capabilities).

use std::fmt;

/// The oldest QEMU that migrates vhost-user-fs devices, as `MAJOR.MINOR`.
pub const VIRTIOFS_MIGRATION_MIN: &str = "8.2";

/// [`VIRTIOFS_MIGRATION_MIN`] as numbers (kept equal by a unit test).
const VIRTIOFS_MIGRATION: QemuVersion = QemuVersion {
    major: 8,
    minor: 2,
    micro: 0,
};

/// A QEMU release, `MAJOR.MINOR.MICRO` (`8.1.90` is a release candidate of 8.2, and older).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl QemuVersion {
    /// The release named by `--version`'s answer (its first line is read: `... version X.Y.Z
    /// ...`, the micro number optional); `None` when the line names none.
    pub fn parse(version: &str) -> Option<Self> {
        let line = version.lines().next()?;
        let mut words = line.split_whitespace();
        words.by_ref().find(|w| *w == "version")?;
        let number = words.next()?;
        let mut parts = number.split('.');
        let mut part = |required: bool| -> Option<u32> {
            match parts.next() {
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
                None if !required => Some(0),
                _ => None,
            }
        };
        let v = Self {
            major: part(true)?,
            minor: part(true)?,
            micro: part(false)?,
        };
        parts.next().is_none().then_some(v)
    }

    /// `MAJOR.MINOR`, as messages name a QEMU (`QEMU 7.2`).
    pub fn short(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Whether the QEMU whose `--version` answer (or its first line) is `version` can migrate a
/// vhost-user-fs device, i.e. snapshot a VM whose store or shares are virtio-fs: QEMU ≥ 8.2. An
/// answer that names no version cannot.
pub fn qemu_can_migrate_virtiofs(version: &str) -> bool {
    QemuVersion::parse(version).is_some_and(|v| v >= VIRTIOFS_MIGRATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofs_migration_from_the_version_line() {
        let table = [
            (
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)",
                Some("7.2.22"),
                false,
            ),
            ("QEMU emulator version 8.1.5", Some("8.1.5"), false),
            (
                "QEMU emulator version 8.1.90 (v8.2.0-rc0)",
                Some("8.1.90"),
                false,
            ),
            ("QEMU emulator version 8.2.0", Some("8.2.0"), true),
            ("QEMU emulator version 8.2", Some("8.2.0"), true),
            (
                "QEMU emulator version 9.0.0 (qemu-9.0.0-1.fc40)",
                Some("9.0.0"),
                true,
            ),
            (
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers",
                Some("10.0.2"),
                true,
            ),
            ("QEMU emulator version 10.0.2", Some("10.0.2"), true),
            ("QEMU emulator version 12.10.1", Some("12.10.1"), true),
            ("", None, false),
            ("garbage", None, false),
            ("QEMU emulator version", None, false),
            ("QEMU emulator version x.y.z", None, false),
            ("QEMU emulator version 8", None, false),
            ("QEMU emulator version 8.2.0.1", None, false),
            ("QEMU emulator version 8..2", None, false),
            ("QEMU emulator version -8.2.0", None, false),
            ("Copyright\nQEMU emulator version 10.0.2", None, false),
        ];
        for (line, parsed, can) in table {
            assert_eq!(
                QemuVersion::parse(line).map(|v| v.to_string()).as_deref(),
                parsed,
                "{line:?}"
            );
            assert_eq!(qemu_can_migrate_virtiofs(line), can, "{line:?}");
        }
    }

    #[test]
    fn the_minimum_is_stated_once() {
        assert_eq!(VIRTIOFS_MIGRATION.short(), VIRTIOFS_MIGRATION_MIN);
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 7.2.22").map(|v| v.short()),
            Some("7.2".into())
        );
    }
}
