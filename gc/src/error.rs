//! The crate's top error type: every module's error, classified as its cause is
//! ([`Classify`]), so that the binary tells bad input (exit 2), a failure (exit 1) and an
//! interruption (exit 130) apart.

use crate::exitclass::{Classify, ExitClass};

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Reading Nix's database.
    #[error(transparent)]
    NixDb(#[from] crate::nixdb::NixDbError),
    /// Finding GC roots.
    #[error(transparent)]
    Roots(#[from] crate::roots::RootsError),
    /// Reading the store directory.
    #[error(transparent)]
    StoreCheck(#[from] crate::ondisk::StoreCheckError),
    /// The runs database.
    #[error(transparent)]
    RunsDb(#[from] crate::runsdb::RunsDbError),
    /// Deleting.
    #[error(transparent)]
    Reclaim(#[from] crate::reclaim::ReclaimError),
    /// Measuring disk usage.
    #[error(transparent)]
    Du(#[from] crate::du::DuError),
    /// Tracking a command.
    #[error(transparent)]
    Track(#[from] crate::track::TrackError),
    /// Selecting runs.
    #[error(transparent)]
    Select(#[from] crate::select::SelectError),
    /// Reading Nix's configuration.
    #[error(transparent)]
    NixConf(#[from] crate::nixconf::NixConfError),
}

impl Classify for GcError {
    /// The class of the module error it wraps.
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::NixDb(e) => e.exit_class(),
            Self::Roots(e) => e.exit_class(),
            Self::StoreCheck(e) => e.exit_class(),
            Self::RunsDb(e) => e.exit_class(),
            Self::Reclaim(e) => e.exit_class(),
            Self::Du(e) => e.exit_class(),
            Self::Track(e) => e.exit_class(),
            Self::Select(e) => e.exit_class(),
            Self::NixConf(e) => e.exit_class(),
        }
    }
}

impl GcError {
    /// `self.exit_class() == ExitClass::BadInput`, for drydock-vm's own `is_bad_input`s until
    /// they ask [`Classify`]; remove then.
    pub fn is_bad_input(&self) -> bool {
        self.exit_class() == ExitClass::BadInput
    }

    /// `self.exit_class() == ExitClass::Interrupted`, for drydock-vm's own `is_interrupted`
    /// until it asks [`Classify`]; remove then.
    pub fn is_interrupted(&self) -> bool {
        self.exit_class() == ExitClass::Interrupted
    }
}
