//! What a store path is, from its name: a VM test run's output, a test driver, a VM system, a
//! disk image, a derivation, or something else. Used for `track`, `runs` and `du`.

use crate::store_path::StorePath;

/// The category of a store path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathClass {
    /// `vm-test-run-*`: the output of running a NixOS VM test.
    TestRun,
    /// `nixos-test-driver-*`: the test driver.
    TestDriver,
    /// `nixos-system-*`: a VM's system closure top level.
    VmSystem,
    /// Disk images (`*.qcow2`, `*.img`, `*.iso`, `nixos-disk-image*`, `*-image`).
    DiskImage,
    /// A `.drv` file.
    Derivation,
    /// Anything else.
    Other,
}

impl PathClass {
    /// Every class, in display order.
    pub const ALL: [PathClass; 6] = [
        Self::TestRun,
        Self::TestDriver,
        Self::VmSystem,
        Self::DiskImage,
        Self::Derivation,
        Self::Other,
    ];

    /// The stable name used in the runs database and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TestRun => "test_run",
            Self::TestDriver => "test_driver",
            Self::VmSystem => "vm_system",
            Self::DiskImage => "disk_image",
            Self::Derivation => "derivation",
            Self::Other => "other",
        }
    }

    /// The class named `s` by [`PathClass::as_str`], if any.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Parse [`PathClass::as_str`] back (unknown names are `Other`).
    pub fn parse(s: &str) -> Self {
        Self::from_name(s).unwrap_or(Self::Other)
    }

    /// Whether the class is a test artifact (counted by `du`).
    pub fn is_test_artifact(self) -> bool {
        !matches!(self, Self::Other)
    }
}

/// Classify a store path by its name.
pub fn classify(p: &StorePath) -> PathClass {
    let name = p.name();
    if p.is_derivation() {
        return PathClass::Derivation;
    }
    if name.starts_with("vm-test-run-") {
        PathClass::TestRun
    } else if name.starts_with("nixos-test-driver") {
        PathClass::TestDriver
    } else if name.starts_with("nixos-system-") {
        PathClass::VmSystem
    } else if name.ends_with(".qcow2")
        || name.ends_with(".img")
        || name.ends_with(".iso")
        || name.ends_with(".raw")
        || name.contains("disk-image")
        || name.ends_with("-image")
    {
        PathClass::DiskImage
    } else {
        PathClass::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str) -> PathClass {
        classify(&StorePath::from_base_name(&format!("{}-{name}", "0".repeat(32))).unwrap())
    }

    #[test]
    fn classes_by_name() {
        assert_eq!(c("vm-test-run-login"), PathClass::TestRun);
        assert_eq!(c("vm-test-run-login.drv"), PathClass::Derivation);
        assert_eq!(c("nixos-test-driver-1.1"), PathClass::TestDriver);
        assert_eq!(c("nixos-system-machine-23.11"), PathClass::VmSystem);
        assert_eq!(c("nixos.qcow2"), PathClass::DiskImage);
        assert_eq!(c("nixos-disk-image"), PathClass::DiskImage);
        assert_eq!(c("bash-5.2"), PathClass::Other);
        for k in PathClass::ALL {
            assert_eq!(PathClass::parse(k.as_str()), k);
        }
        assert_eq!(PathClass::parse("nonsense"), PathClass::Other);
        assert!(!PathClass::Other.is_test_artifact() && PathClass::TestRun.is_test_artifact());
    }
}
