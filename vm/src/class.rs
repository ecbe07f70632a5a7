//! The exit class of each of drydock-vm's public errors (`drydock_gc::Classify`), and
//! [`exit_class_of`], the one place that knows which of a chain's causes are this crate's: the
//! binary asks it (and drydock-cluster's and drydock-gc's twins) instead of knowing the types.

use std::error::Error;

use drydock_gc::{Classify, ExitClass};

use crate::{
    CollectError, DoctorError, FstabError, ImageError, LaunchError, LauncherError, LifecycleError,
    OwnerError, PlanError, QmpError, RegInfoError, ResolveError, SnapshotError, SpawnError,
    StoreServerError, SystemError,
};

drydock_gc::classify_by_bad_input!(
    DoctorError,
    ImageError,
    LaunchError,
    LauncherError,
    LifecycleError,
    OwnerError,
    PlanError,
    QmpError,
    RegInfoError,
    ResolveError,
    SnapshotError,
    SpawnError,
    StoreServerError,
    SystemError,
);

impl Classify for FstabError {
    /// The guest's fstab asks for what drydock cannot give: the system is the bad input.
    fn exit_class(&self) -> ExitClass {
        ExitClass::BadInput
    }
}

impl Classify for CollectError {
    fn exit_class(&self) -> ExitClass {
        ExitClass::of(self.is_interrupted(), self.is_bad_input())
    }
}

/// The class of `cause` if it is one of drydock-vm's public errors.
pub fn exit_class_of(cause: &(dyn Error + 'static)) -> Option<ExitClass> {
    drydock_gc::return_class_if_one_of!(
        cause;
        CollectError,
        DoctorError,
        FstabError,
        ImageError,
        LaunchError,
        LauncherError,
        LifecycleError,
        OwnerError,
        PlanError,
        QmpError,
        RegInfoError,
        ResolveError,
        SnapshotError,
        SpawnError,
        StoreServerError,
        SystemError,
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_crates_errors_are_classified_and_others_are_not() {
        let bad = SystemError::NotInStore {
            path: "/tmp/x".into(),
            store: "/nix/store".into(),
        };
        assert_eq!(exit_class_of(&bad), Some(ExitClass::BadInput));
        let other = std::io::Error::other("x");
        assert_eq!(exit_class_of(&other), None);
    }
}
