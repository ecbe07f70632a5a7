//! The crate's top error type: every module's error, with a way for the binary to tell bad
//! input (exit 2) from a failure (exit 1).

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

impl GcError {
    /// Whether the error is the user's input (a store that is not one, an unknown run id, a
    /// corrupt runs database, a bad selection, an unreadable Nix configuration): the binary exits with 2 for these.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NixDb(e) => e.is_bad_input(),
            Self::RunsDb(e) => e.is_bad_input(),
            Self::Track(e) => e.is_bad_input(),
            Self::Select(_) => true,
            Self::NixConf(e) => e.is_bad_input(),
            Self::Roots(_) | Self::StoreCheck(_) | Self::Reclaim(_) | Self::Du(_) => false,
        }
    }

    /// Whether the work stopped because the caller's cancel flag was set (exit 130).
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            Self::Track(crate::track::TrackError::Interrupted { .. })
        )
    }
}
