//! The exit class of each of drydock-vm's public errors (`drydock_gc::Classify`), and
//! [`exit_class_of`], the one place that knows which of a chain's causes are this crate's: the
//! binary asks it (and drydock-cluster's and drydock-gc's twins) instead of knowing the types.

use std::error::Error;

use drydock_gc::{Classify, ExitClass};

use crate::{
    CollectError, DoctorError, ImageError, LaunchError, LauncherError, LifecycleError, OwnerError,
    PlanError, QmpError, ResolveError, SnapshotError, SpawnError, StoreServerError, SystemError,
};

/// Errors whose class is bad input or a failure, as their `is_bad_input` says.
macro_rules! bad_input_or_failed {
    ($($t:ty),* $(,)?) => {$(
        impl Classify for $t {
            fn exit_class(&self) -> ExitClass {
                if self.is_bad_input() {
                    ExitClass::BadInput
                } else {
                    ExitClass::Failed
                }
            }
        }
    )*};
}

bad_input_or_failed!(
    DoctorError,
    ImageError,
    LaunchError,
    LauncherError,
    LifecycleError,
    OwnerError,
    PlanError,
    QmpError,
    ResolveError,
    SnapshotError,
    SpawnError,
    StoreServerError,
    SystemError,
);

impl Classify for CollectError {
    fn exit_class(&self) -> ExitClass {
        if self.is_interrupted() {
            ExitClass::Interrupted
        } else if self.is_bad_input() {
            ExitClass::BadInput
        } else {
            ExitClass::Failed
        }
    }
}

/// The class of `cause` if it is one of drydock-vm's public errors.
pub fn exit_class_of(cause: &(dyn Error + 'static)) -> Option<ExitClass> {
    macro_rules! first_of {
        ($($t:ty),* $(,)?) => {
            $(if let Some(e) = cause.downcast_ref::<$t>() {
                return Some(e.exit_class());
            })*
        };
    }
    first_of!(
        CollectError,
        DoctorError,
        ImageError,
        LaunchError,
        LauncherError,
        LifecycleError,
        OwnerError,
        PlanError,
        QmpError,
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
