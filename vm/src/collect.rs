//! `drydock gc` as a whole: drydock-gc's collection of the store (the selected runs, or every
//! dead path), with what only the VM side knows around it. VMs whose owner died are reaped first
//! (their runs end, so they can be collected like any stopped VM), and store images (drydock
//! state, not store paths) go once no VM that remains uses them: in a dry run, the VM folders
//! the collection would remove are left out of that count; after a real one they are gone.

use std::path::{Path, PathBuf};

use drydock_gc::{
    ArtifactKind, GcError, GcOutcome, GcPlan, Loaded, RunsDb, Selection, StoreLayout,
};

use crate::image::{ImageError, StoreImage, images_in_use, remove_unused_images};
use crate::owner::reap_dead_vms;

/// What to collect.
#[derive(Debug, Clone)]
pub struct GcRequest<'a> {
    pub layout: &'a StoreLayout,
    pub state_dir: &'a Path,
    pub selection: &'a Selection,
    /// Paths per `nix-store --delete`.
    pub batch_size: usize,
    /// Plan only: nothing is deleted.
    pub dry_run: bool,
}

/// What a collection has to say while it works; the caller prints.
#[derive(Debug, Clone, Copy)]
pub enum GcEvent<'a> {
    /// The VM `name` had died with its owner; its run is ended now.
    Reaped(&'a str),
    /// `done` of the plan's `total` paths are deleted (first with `done` 0, before any is).
    Deleting { done: usize, total: usize },
}

/// The store images a collection removes (or would, in a dry run).
#[derive(Debug, Clone, Default)]
pub struct ImageSweep {
    pub images: Vec<StoreImage>,
    /// VM folders whose launch record could not be read, with why: which images they use is
    /// unknown, so every image is kept (`images` is empty).
    pub unreadable: Vec<(PathBuf, String)>,
}

/// What a collection did (or, in a dry run, would do).
#[derive(Debug)]
pub struct Collection {
    pub plan: GcPlan,
    /// The deletion's outcome; absent in a dry run.
    pub outcome: Option<GcOutcome>,
    pub images: ImageSweep,
    /// A dry run: the selected runs' artifacts still there (VM folders, cluster snapshots),
    /// each with its bytes on disk, which the collection would remove.
    pub artifacts: Vec<(PathBuf, u64)>,
}

/// Why a collection failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Gc(#[from] GcError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl CollectError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Gc(e) => e.is_bad_input(),
            Self::Image(e) => e.is_bad_input(),
        }
    }

    /// Ctrl-C ended it: exit 130.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, Self::Gc(e) if e.is_interrupted())
    }
}

/// Collect what `req` selects (see the module's doc); `on` is told what happens.
pub fn collect(
    req: &GcRequest<'_>,
    on: &mut dyn FnMut(GcEvent<'_>),
) -> Result<Collection, CollectError> {
    for name in reap_dead_vms(req.state_dir) {
        on(GcEvent::Reaped(&name));
    }
    // Validate the store before touching the runs database.
    let loaded = Loaded::load(req.layout)?;
    let runs = RunsDb::open(req.state_dir).map_err(GcError::from)?;
    if !req.dry_run {
        drydock_gc::recover_interrupted(req.layout, &runs)?;
    }
    let plan = drydock_gc::plan_gc(&loaded, Some(&runs), req.selection, req.batch_size)?;
    drop(loaded);
    if req.dry_run {
        // Store images only the collected runs' VMs use would go too.
        let mut leaving = Vec::new();
        let mut artifacts = Vec::new();
        for id in &plan.runs {
            for a in runs.artifacts(*id).map_err(GcError::from)? {
                let path = PathBuf::from(&a.path);
                if a.removed_at.is_none() && path.starts_with(req.state_dir) && path.exists() {
                    let bytes = drydock_gc::disk_usage(std::slice::from_ref(&path)).unwrap_or(0);
                    artifacts.push((path.clone(), bytes));
                }
                if a.kind == ArtifactKind::StateDir {
                    leaving.push(path);
                }
            }
        }
        let images = unused_images(req.state_dir, &leaving, true)?;
        return Ok(Collection {
            plan,
            outcome: None,
            images,
            artifacts,
        });
    }
    let total = plan.paths.len();
    on(GcEvent::Deleting { done: 0, total });
    let outcome = drydock_gc::execute_gc(req.layout, Some(&runs), &plan, &mut |done, _| {
        on(GcEvent::Deleting { done, total })
    })?;
    // The collected runs' VM folders are gone now: images no remaining VM uses go too.
    let images = unused_images(req.state_dir, &[], false)?;
    Ok(Collection {
        plan,
        outcome: Some(outcome),
        images,
        artifacts: Vec::new(),
    })
}

/// Store images that no VM outside the folders `leaving` uses; removed unless `dry_run`. When
/// a VM's launch record cannot be read, every image is kept.
fn unused_images(
    state_dir: &Path,
    leaving: &[PathBuf],
    dry_run: bool,
) -> Result<ImageSweep, ImageError> {
    let in_use = images_in_use(state_dir, leaving);
    if !in_use.unreadable.is_empty() {
        return Ok(ImageSweep {
            images: Vec::new(),
            unreadable: in_use.unreadable,
        });
    }
    let images = remove_unused_images(
        &crate::resolve::images_dir(state_dir),
        &in_use.images,
        dry_run,
    )?;
    Ok(ImageSweep {
        images,
        unreadable: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM folder whose launch record names the store image `image` (or is unreadable).
    fn vm(state: &Path, name: &str, image: Option<&Path>) -> PathBuf {
        let paths = crate::plan::VmPaths::in_state_dir(state, name);
        std::fs::create_dir_all(&paths.dir).unwrap();
        match image {
            Some(p) => crate::launch::LaunchRecord {
                spec: crate::plan::VmSpec {
                    name: name.into(),
                    qemu: "/bin/qemu".into(),
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: String::new(),
                    memory_mib: 256,
                    cpus: 1,
                    accel: crate::plan::Accel::Tcg,
                    store: crate::plan::StoreAttachment::Image { path: p.into() },
                    disk: None,
                    paths: paths.clone(),
                    devices: Default::default(),
                    shares: Vec::new(),
                },
                share: None,
                toplevel: None,
                accel_reason: String::new(),
                run_id: None,
                shared_run: false,
                closure_key: None,
                store: None,
                profile: Default::default(),
                reginfo: None,
            }
            .write(&paths)
            .unwrap(),
            None => std::fs::write(paths.launch_file(), "{ not json").unwrap(),
        }
        paths.dir
    }

    #[test]
    fn images_go_once_no_remaining_vm_uses_them() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path();
        let images = crate::resolve::images_dir(state);
        std::fs::create_dir_all(&images).unwrap();
        let image = |c: char| {
            let p = images.join(format!("{}.erofs", c.to_string().repeat(32)));
            std::fs::write(&p, b"img").unwrap();
            p
        };
        let (a, b) = (image('a'), image('b'));
        let va = vm(state, "va", Some(&a));
        vm(state, "vb", Some(&b));
        let names = |s: &ImageSweep| s.images.iter().map(|i| i.path.clone()).collect::<Vec<_>>();

        // (VM folders left out, dry run) → the images that go.
        let sweep = unused_images(state, &[], true).unwrap();
        assert!(sweep.images.is_empty() && sweep.unreadable.is_empty());
        let sweep = unused_images(state, std::slice::from_ref(&va), true).unwrap();
        assert_eq!(names(&sweep), std::slice::from_ref(&a));
        assert!(a.exists(), "a dry run removes nothing");

        // A VM whose record cannot be read keeps every image, and says why.
        let broken = vm(state, "broken", None);
        let sweep = unused_images(state, std::slice::from_ref(&va), false).unwrap();
        assert!(sweep.images.is_empty(), "{:?}", sweep.images);
        assert_eq!(sweep.unreadable.len(), 1);
        assert!(a.exists());
        std::fs::remove_dir_all(&broken).unwrap();

        // For real: va's folder is gone, so its image goes; vb's stays.
        std::fs::remove_dir_all(&va).unwrap();
        let sweep = unused_images(state, &[], false).unwrap();
        assert_eq!(names(&sweep), std::slice::from_ref(&a));
        assert!(!a.exists() && b.exists());
    }
}
