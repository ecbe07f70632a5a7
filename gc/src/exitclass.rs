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
