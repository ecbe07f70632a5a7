//! drydock's view of the Nix store: store paths, `.drv` parsing, the runs database and safe
//! collection through Nix itself.
//!
//! Layers: a pure planning layer (liveness, dead sets, batches: [`Liveness`], [`dead_set`])
//! computed from a read-only [`Snapshot`] of Nix's database and the roots found on disk; and a
//! thin effectful layer. Only one private module deletes anything, and store paths are deleted
//! only through `nix-store --delete` with the same `--store`.

mod check;
mod classify;
mod collect;
mod drv;
mod du;
mod error;
mod fsread;
mod names;
mod nixconf;
mod nixdb;
mod plan;
mod private;
mod reclaim;
mod roots;
mod runsdb;
mod store_path;
#[allow(unsafe_code)]
mod sys;
mod track;

pub use check::{Blocked, Damage, OnDisk, RepairPlan, StoreCheckError, StoreEntries};
pub use classify::{PathClass, classify};
pub use collect::{
    ClearedRoots, DEFAULT_BATCH, DuReport, Explanation, GcOutcome, GcPlan, KeptPath, Loaded,
    PathStatus, RunSummary, SelectError, Selection, check, clear_blocking_roots, du, execute_gc,
    parse_duration, plan_gc, recover_interrupted, repair, run_statuses, summarize_runs,
};
pub use drv::{Derivation, DrvOutput, DrvParseError, parse_derivation, unparse_derivation};
pub use du::{DuError, InodeSet, disk_usage, freeable};
pub use error::GcError;
pub use fsread::{Links, MAX_STATE_BYTES, ReadFileError, read_regular};
pub use names::NameList;
pub use nixconf::{NixConf, NixConfError, NixConfSources, Setting};
pub use nixdb::{NixDb, NixDbError, Node, PathInfo, Snapshot};
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
pub use store_path::{StoreLayout, StorePath, StorePathError, store_option_hint};
pub use sys::{effective_uid, lock_exclusive_within, send_signal};
pub use track::{Echo, TrackError, TrackReport, ensure_store, track, track_to};

/// Seconds since the epoch, now (0 if the clock is before 1970).
pub fn epoch_secs() -> i64 {
    runsdb::now()
}

/// FNV-1a (64 bits) of some bytes: short, stable names (pin links, socket folders, lock files).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    runsdb::fnv1a(bytes)
}
