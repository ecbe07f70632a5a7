//! drydock's view of the Nix store: store paths, `.drv` parsing, the runs database and safe
//! collection through Nix itself.
//!
//! Layers: a pure planning layer (liveness, dead sets, batches: [`Liveness`], [`dead_set`])
//! computed from a read-only [`Snapshot`] of Nix's database and the roots found on disk; and a
//! thin effectful layer. Only one private module deletes anything, and store paths are deleted
//! only through `nix-store --delete` with the same `--store`.
//!
//! Modules import only modules of lower layers (or of their own layer, listed before them), so
//! that the imports form a DAG (`grep -n 'crate::' gc/src/*.rs` outside `mod tests` shows it):
//!
//! 0. `exitclass` ([`ExitClass`], [`Classify`]) and `deadline` ([`Deadline`]), importing
//!    nothing of the crate; every module with an error type imports `exitclass` (not repeated
//!    below);
//! 1. leaves: `cancel` ([`Cancel`]), `store_path`, `drv`, `names`, `fsread`; then `sys` (the
//!    only `unsafe`; deadline), `private` (the one maker of drydock's folders, files and
//!    sockets: 0700/0600, no links followed; sys), `child` (a blocking wait for a child's exit;
//!    sys, deadline) and `nixcmd` (a Nix command with a deadline; child);
//! 2. reading the store: `classify`, `du` (store_path); `nixconf` (fsread); `nixdb` (names,
//!    store_path); `roots` (store_path, sys); `ondisk` (nixdb, store_path);
//! 3. the pure planner: `plan` (ondisk, nixconf, nixdb, roots), then `check` (plan, ondisk);
//! 4. effects: `reclaim`, the one deleter (nixcmd, nixdb); `runsdb` (classify, names,
//!    private, reclaim); `select` (runsdb); `track` (drv, fsread, nixcmd, nixdb, sys);
//! 5. `error`: [`GcError`], the umbrella over every module's error;
//! 6. the operations that return it: `track_run` (`track`, `track_to`) and `collect` (`gc`,
//!    `runs`, `du`, `store check/repair`).

mod cancel;
mod check;
mod child;
mod classify;
mod collect;
mod deadline;
mod drv;
mod du;
mod error;
mod exitclass;
mod fsread;
mod names;
mod nixcmd;
mod nixconf;
mod nixdb;
mod ondisk;
mod plan;
mod private;
mod reclaim;
mod roots;
mod runsdb;
mod select;
mod store_path;
#[allow(unsafe_code)]
mod sys;
mod track;
mod track_run;

pub use cancel::{Cancel, OnCancel};
pub use check::{Blocked, Damage, RepairPlan};
pub use classify::{PathClass, classify};
pub use collect::{
    ClearedRoots, DEFAULT_BATCH, DuReport, Explanation, GcOutcome, GcPlan, KeptPath, Loaded,
    PathStatus, RunSummary, check, clear_blocking_roots, du, execute_gc, plan_gc,
    recover_interrupted, repair, run_statuses, summarize_runs,
};
pub use deadline::Deadline;
pub use drv::{Derivation, DrvOutput, DrvParseError, parse_derivation, unparse_derivation};
pub use du::{DuError, InodeSet, disk_usage, freeable};
pub use error::GcError;
pub use exitclass::{Classify, ExitClass};
pub use fsread::{Links, MAX_STATE_BYTES, ReadFileError, read_regular};
pub use names::NameList;
pub use nixconf::{NixConf, NixConfError, NixConfSources, Setting};
pub use nixdb::{NixDb, NixDbError, Node, PathInfo, Snapshot};
pub use ondisk::{OnDisk, StoreCheckError, StoreEntries};
pub use plan::{ChainStep, DeadSet, Edge, GcSettings, Held, Liveness, batches, dead_set};
pub use private::{
    DIR_MODE, FILE_MODE, PrivateError, bind_datagram, bind_listener, check_private,
    check_private_tree, create_nofollow, open_append_nofollow, open_nofollow, private_dir,
    private_tree, write_atomic,
};
pub use reclaim::{DeleteResult, ReclaimError};
pub use roots::{Root, RootKind, RootsError};
pub use runsdb::{
    Artifact, ArtifactKind, OtherStoreRuns, Pin, Run, RunKind, RunPath, RunsDb, RunsDbError,
    UnfinishedGc,
};
pub use select::{SelectError, Selection, parse_duration};
pub use store_path::{StoreLayout, StorePath, StorePathError, store_option_hint};
pub use sys::{die_with_parent, effective_uid, lock_exclusive_within, send_signal};
pub use track::{Echo, TrackError, ensure_store};
pub use track_run::{TrackAs, TrackReport, track, track_as, track_to};

/// Seconds since the epoch, now (0 if the clock is before 1970).
pub fn epoch_secs() -> i64 {
    runsdb::now()
}

/// FNV-1a (64 bits) of some bytes: short, stable names (pin links, socket folders, lock files).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    runsdb::fnv1a(bytes)
}

/// The exit class of `cause` if it is one of this crate's public error types (the one place
/// that lists them; each classifies itself through [`Classify`]), `None` for any other error.
/// The binary asks it of each error of a chain.
pub fn exit_class_of(cause: &(dyn std::error::Error + 'static)) -> Option<ExitClass> {
    return_class_if_one_of!(
        cause;
        GcError,
        DrvParseError,
        DuError,
        NixConfError,
        NixDbError,
        PrivateError,
        ReadFileError,
        ReclaimError,
        RootsError,
        RunsDbError,
        SelectError,
        StoreCheckError,
        StorePathError,
        TrackError,
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn every_public_error_type_is_classified() {
        let io = || std::io::Error::other("x");
        let path = PathBuf::from("/x");
        let cases: Vec<(Box<dyn std::error::Error>, ExitClass)> = vec![
            (
                Box::new(GcError::Select(SelectError::NothingSelected)),
                ExitClass::BadInput,
            ),
            (Box::new(DrvParseError::UnexpectedEof), ExitClass::BadInput),
            (
                Box::new(DuError::Read {
                    path: path.clone(),
                    source: io(),
                }),
                ExitClass::Failed,
            ),
            (
                Box::new(NixConfError::MissingInclude {
                    path: path.clone(),
                    from: "nix.conf".into(),
                }),
                ExitClass::BadInput,
            ),
            (
                Box::new(NixDbError::NotAStore {
                    root: path.clone(),
                    db: path.clone(),
                }),
                ExitClass::BadInput,
            ),
            (
                Box::new(ReadFileError::TooLarge {
                    path: path.clone(),
                    limit: 1,
                }),
                ExitClass::Failed,
            ),
            (
                Box::new(PrivateError::Loose {
                    path: path.clone(),
                    mode: 0o777,
                    who: "every user",
                }),
                ExitClass::BadInput,
            ),
            (
                Box::new(PrivateError::Io {
                    path: path.clone(),
                    source: io(),
                }),
                ExitClass::Failed,
            ),
            (
                Box::new(ReclaimError::Timeout(std::time::Duration::from_secs(1))),
                ExitClass::Failed,
            ),
            (
                Box::new(RootsError::ReadDir {
                    path: path.clone(),
                    source: io(),
                }),
                ExitClass::Failed,
            ),
            (Box::new(RunsDbError::UnknownRun(1)), ExitClass::BadInput),
            (
                Box::new(RunsDbError::NotPrivate(PrivateError::NotOwned {
                    path: path.clone(),
                    owner: 1000,
                    uid: 0,
                })),
                ExitClass::BadInput,
            ),
            (
                Box::new(SelectError::BadDuration("7y".into())),
                ExitClass::BadInput,
            ),
            (
                Box::new(StoreCheckError::ReadStore {
                    path: path.clone(),
                    source: io(),
                }),
                ExitClass::Failed,
            ),
            (
                Box::new(StorePathError::TooShort("x".into())),
                ExitClass::BadInput,
            ),
            (
                Box::new(TrackError::Interrupted {
                    run_id: 1,
                    exit_code: 0,
                }),
                ExitClass::Interrupted,
            ),
        ];
        for (e, class) in &cases {
            assert_eq!(exit_class_of(e.as_ref()), Some(*class), "{e:?}");
        }
        assert_eq!(exit_class_of(&io()), None);
    }

    #[test]
    fn the_umbrella_error_is_classified_as_its_cause() {
        let interrupted = GcError::from(TrackError::Interrupted {
            run_id: 1,
            exit_code: 3,
        });
        assert_eq!(interrupted.exit_class(), ExitClass::Interrupted);
        let failed = GcError::from(TrackError::InitFailed {
            root: "/x".into(),
            message: String::new(),
        });
        assert_eq!(failed.exit_class(), ExitClass::Failed);
        let bad = GcError::from(RunsDbError::UnknownRun(7));
        assert_eq!(bad.exit_class(), ExitClass::BadInput);
        // The shims drydock-vm still calls agree.
        assert!(bad.is_bad_input() && !bad.is_interrupted());
        assert!(interrupted.is_interrupted() && !interrupted.is_bad_input());
    }
}
