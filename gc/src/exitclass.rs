//! Exit classes carried by errors: every public error of the workspace's libraries says whether
//! it is the caller's bad input, a failure, or an interruption ([`Classify`]), and the binary
//! turns the class into its exit code ([`ExitClass::code`]) instead of knowing every error
//! type. Defined here, in the base crate, so that drydock-vm and drydock-cluster classify their
//! errors with the same types.

/// How a command that ended with an error exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitClass {
    /// Bad usage or bad input (the message names it): a store that is not one, an unknown run
    /// id, a command that cannot be started, an invalid configuration.
    BadInput,
    /// The thing checked or asked for failed (an I/O error, Nix refusing, a timeout).
    Failed,
    /// Interrupted by Ctrl-C, SIGTERM or SIGHUP after cleaning up.
    Interrupted,
}

impl ExitClass {
    /// The process's exit code for this class: 2 for [`ExitClass::BadInput`], 1 for
    /// [`ExitClass::Failed`], 130 (128 + SIGINT, as a shell reports Ctrl-C) for
    /// [`ExitClass::Interrupted`].
    pub fn code(self) -> u8 {
        match self {
            Self::BadInput => 2,
            Self::Failed => 1,
            Self::Interrupted => 130,
        }
    }
}

impl ExitClass {
    /// Interrupted if `interrupted`, else bad input if `bad_input`, else failed: the order every
    /// error that can be all three decides in.
    pub fn of(interrupted: bool, bad_input: bool) -> Self {
        if interrupted {
            Self::Interrupted
        } else if bad_input {
            Self::BadInput
        } else {
            Self::Failed
        }
    }
}

/// `Classify` for error types whose class is bad input or a failure, as their inherent
/// `is_bad_input()` says (one copy for every crate of the workspace).
#[macro_export]
macro_rules! classify_by_bad_input {
    ($($t:ty),* $(,)?) => {$(
        impl $crate::Classify for $t {
            fn exit_class(&self) -> $crate::ExitClass {
                $crate::ExitClass::of(false, self.is_bad_input())
            }
        }
    )*};
}

/// In a function returning `Option<ExitClass>`: return the class of `cause` if it is one of the
/// listed types (a crate's `exit_class_of` lists its own public errors with it).
#[macro_export]
macro_rules! return_class_if_one_of {
    ($cause:expr; $($t:ty),* $(,)?) => {
        $(if let Some(e) = $cause.downcast_ref::<$t>() {
            return Some($crate::Classify::exit_class(e));
        })*
    };
}

/// An error that knows its exit class. An error whose class depends on its cause (an umbrella
/// error, a variant wrapping another library error) asks the cause, so that the outermost
/// error of a chain speaks for the whole chain.
pub trait Classify {
    /// The class of this error.
    fn exit_class(&self) -> ExitClass;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(ExitClass::BadInput.code(), 2);
        assert_eq!(ExitClass::Failed.code(), 1);
        assert_eq!(ExitClass::Interrupted.code(), 130);
    }
}
