//! The only module that deletes anything. Store paths go only through `nix-store --delete`
//! (with the same `--store`), which takes Nix's GC lock and refuses live paths; what Nix
//! refuses is reported, never forced. Besides that: drydock's own pin links and VM artifacts
//! inside the state directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::deadline::Deadline;
use crate::exitclass::{Classify, ExitClass};
use crate::nixdb::{NixDb, NixDbError};
use crate::store_path::{StoreLayout, StorePath};

/// Errors deleting.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// `nix-store` could not be started.
    #[error("cannot run nix-store")]
    Spawn(#[source] std::io::Error),
    /// Checking what is gone needs the database.
    #[error("checking deleted paths")]
    Verify(#[source] NixDbError),
    /// `nix-store --delete` did not finish in time (another GC holding the lock for ever?).
    #[error("nix-store --delete did not finish within {} s; it was stopped", .0.as_secs())]
    Timeout(Duration),
    /// The per-store collection lock could not be created.
    #[error("cannot create the collection lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another drydock collection of the store held the lock for too long.
    #[error("another drydock gc of this store held {} for {} s; try again when it is done", path.display(), after.as_secs())]
    LockTimeout { path: PathBuf, after: Duration },
    /// Removing a file or directory failed.
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for ReclaimError {
    /// Always a failure: deleting is asked of drydock, and whatever stops it (Nix, the
    /// database checked afterwards, a lock held too long) is not the user's input.
    fn exit_class(&self) -> ExitClass {
        ExitClass::Failed
    }
}

/// What happened to the paths of one or more batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteResult {
    /// Paths that are gone: unregistered and not on disk.
    pub gone: Vec<StorePath>,
    /// Paths still there, with Nix's reason.
    pub refused: Vec<(StorePath, String)>,
}

fn nix_store_delete(
    layout: &StoreLayout,
    paths: &[StorePath],
) -> Result<(bool, String), ReclaimError> {
    let mut cmd = Command::new("nix-store");
    cmd.args(layout.nix_args()).arg("--delete");
    cmd.args(paths.iter().map(|p| layout.logical(p)));
    tracing::debug!("running nix-store --delete on {} paths", paths.len());
    // Waiting for Nix's GC lock is expected; waiting for ever is not.
    match crate::nixcmd::run_nix(cmd, Deadline::after(DELETE_DEADLINE))
        .map_err(ReclaimError::Spawn)?
    {
        Some((status, stderr)) => Ok((status.success(), stderr)),
        None => Err(ReclaimError::Timeout(DELETE_DEADLINE)),
    }
}

/// How long one batch's `nix-store --delete` may take.
const DELETE_DEADLINE: Duration = Duration::from_secs(30 * 60);

fn error_line(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or("nix-store --delete did not delete it")
        .trim()
        .to_owned()
}

/// Whether a path is really gone: not registered and nothing on disk.
fn is_gone(layout: &StoreLayout, db: &NixDb, p: &StorePath) -> Result<bool, ReclaimError> {
    if db.is_valid(p).map_err(ReclaimError::Verify)? {
        return Ok(false);
    }
    Ok(std::fs::symlink_metadata(layout.physical(p)).is_err())
}

/// Delete one batch through `nix-store --delete`, then check each path. If Nix stopped at a
/// path it refused, the rest are retried one by one so that one live path does not keep the
/// whole batch.
pub fn delete_batch(
    layout: &StoreLayout,
    db: &NixDb,
    batch: &[StorePath],
) -> Result<DeleteResult, ReclaimError> {
    let (ok, stderr) = nix_store_delete(layout, batch)?;
    let mut res = DeleteResult::default();
    let mut left = Vec::new();
    for p in batch {
        if is_gone(layout, db, p)? {
            res.gone.push(p.clone());
        } else {
            left.push(p.clone());
        }
    }
    if left.is_empty() {
        return Ok(res);
    }
    if ok || left.len() == 1 {
        let why = error_line(&stderr);
        res.refused
            .extend(left.into_iter().map(|p| (p, why.clone())));
        return Ok(res);
    }
    for p in left {
        let (_, stderr) = nix_store_delete(layout, std::slice::from_ref(&p))?;
        if is_gone(layout, db, &p)? {
            res.gone.push(p);
        } else {
            tracing::info!("Nix refused to delete {p}");
            res.refused.push((p, error_line(&stderr)));
        }
    }
    Ok(res)
}

/// Remove one of drydock's own symlinks (a pin). A link that is already gone is fine; a
/// path that is not a symlink is left alone.
pub fn remove_link(path: &Path) -> Result<(), ReclaimError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::remove_file(path).map_err(|source| ReclaimError::Remove {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => {
            tracing::warn!("not removing {}: not a symlink", path.display());
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// Remove a VM artifact (file or directory tree), but only inside drydock's state
/// directory. Returns whether something was removed.
pub fn remove_artifact(state_dir: &Path, path: &Path) -> Result<bool, ReclaimError> {
    let inside = path.is_absolute()
        && path.starts_with(state_dir)
        && path != state_dir
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !inside {
        tracing::warn!(
            "leaving artifact {} in place: outside the state directory",
            path.display()
        );
        return Ok(false);
    }
    let r = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(false),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    r.map_err(|source| ReclaimError::Remove {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_only_inside_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let vm = state.join("vms/a");
        std::fs::create_dir_all(vm.join("sub")).unwrap();
        std::fs::write(vm.join("sub/disk.qcow2"), b"x").unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        assert!(!remove_artifact(&state, &outside).unwrap());
        assert!(outside.exists());
        assert!(!remove_artifact(&state, &state).unwrap());
        assert!(!remove_artifact(&state, &state.join("vms/../../outside")).unwrap());
        assert!(outside.exists());
        assert!(remove_artifact(&state, &vm).unwrap());
        assert!(!vm.exists());
        assert!(!remove_artifact(&state, &vm).unwrap());
    }

    #[test]
    fn links_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let l = dir.path().join("l");
        std::os::unix::fs::symlink("/nix/store/x", &l).unwrap();
        remove_link(&f).unwrap();
        assert!(f.exists());
        remove_link(&l).unwrap();
        assert!(std::fs::symlink_metadata(&l).is_err());
        remove_link(&l).unwrap();
    }
}
