//! The exit class of each of drydock-cluster's public errors (`drydock_gc::Classify`), and
//! [`exit_class_of`], the one place that knows which of a chain's causes are this crate's (the
//! binary asks it, and drydock-vm's and drydock-gc's twins, instead of knowing the types).

use std::error::Error;

use drydock_gc::{Classify, ExitClass};

use crate::apply::ReloadError;
use crate::backdoor::BackdoorError;
use crate::compose::ComposeError;
use crate::control::ControlError;
use crate::copy::CopyError;
use crate::eval::EvalError;
use crate::hub::HubError;
use crate::net::NetError;
use crate::session::SessionError;
use crate::snapshot::SnapshotError;
use crate::state::{ClusterError, MachineError};
use crate::testrun::TestError;
use crate::watch::WatchError;

drydock_gc::classify_by_bad_input!(
    BackdoorError,
    ComposeError,
    ControlError,
    MachineError,
    NetError,
    ReloadError,
);

impl Classify for EvalError {
    /// An evaluation or build stopped by Ctrl-C or SIGTERM is an interruption (also when the
    /// build's own `track` says so); otherwise as `is_bad_input` says.
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::Interrupted => ExitClass::Interrupted,
            Self::Track(e) if e.exit_class() == ExitClass::Interrupted => ExitClass::Interrupted,
            _ if self.is_bad_input() => ExitClass::BadInput,
            _ => ExitClass::Failed,
        }
    }
}

impl Classify for CopyError {
    /// A copy's call to the guest classifies itself (an interrupted call is an interruption).
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::Call(e) => e.exit_class(),
            _ if self.is_bad_input() => ExitClass::BadInput,
            _ => ExitClass::Failed,
        }
    }
}

/// A hub or the watcher failing is never the caller's input.
macro_rules! failed {
    ($($t:ty),* $(,)?) => {$(
        impl Classify for $t {
            fn exit_class(&self) -> ExitClass {
                ExitClass::Failed
            }
        }
    )*};
}

failed!(HubError, WatchError);

impl Classify for ClusterError {
    fn exit_class(&self) -> ExitClass {
        ExitClass::of(
            matches!(self, ClusterError::Interrupted),
            self.is_bad_input(),
        )
    }
}

impl Classify for SessionError {
    fn exit_class(&self) -> ExitClass {
        ExitClass::of(self.is_interrupted(), self.is_bad_input())
    }
}

impl Classify for SnapshotError {
    /// A restore stopped by Ctrl-C is an interruption; a corrupt snapshot a failure.
    fn exit_class(&self) -> ExitClass {
        ExitClass::of(self.is_interrupted(), self.is_bad_input())
    }
}

impl Classify for TestError {
    /// A script that does not parse, a missing python3, a bad composition: bad input; Ctrl-C
    /// (here or in the evaluation, build or start below): an interruption.
    fn exit_class(&self) -> ExitClass {
        ExitClass::of(self.is_interrupted(), self.is_bad_input())
    }
}

/// The class of `cause` if it is one of drydock-cluster's public errors.
pub fn exit_class_of(cause: &(dyn Error + 'static)) -> Option<ExitClass> {
    drydock_gc::return_class_if_one_of!(
        cause;
        SessionError,
        TestError,
        SnapshotError,
        BackdoorError,
        ClusterError,
        ComposeError,
        ControlError,
        CopyError,
        EvalError,
        HubError,
        MachineError,
        NetError,
        ReloadError,
        WatchError,
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_crates_errors_are_classified_and_others_are_not() {
        let bad = ClusterError::NotUp {
            name: "c".into(),
            up: Vec::new(),
        };
        assert_eq!(exit_class_of(&bad), Some(ExitClass::BadInput));
        assert_eq!(
            exit_class_of(&SessionError::Cluster(ClusterError::Interrupted)),
            Some(ExitClass::Interrupted)
        );
        assert_eq!(
            exit_class_of(&EvalError::Interrupted),
            Some(ExitClass::Interrupted)
        );
        assert_eq!(
            exit_class_of(&ClusterError::Interrupted),
            Some(ExitClass::Interrupted)
        );
        // A backdoor that restarted under a call is a failure, not the caller's input.
        assert_eq!(
            exit_class_of(&ClusterError::Restarted { vm: "c.m".into() }),
            Some(ExitClass::Failed)
        );
        assert_eq!(
            exit_class_of(&BackdoorError::Restarted),
            Some(ExitClass::Failed)
        );
        assert_eq!(exit_class_of(&std::io::Error::other("x")), None);
    }
}
