//! The store directory as it is on disk: its entries listed once (no `stat` per entry), and
//! resolved against a [`Snapshot`] of Nix's database (which registered paths are present,
//! which entries are not registered). Read by the planner (`plan`) and by `store check`
//! (`check`), both above it.

use std::path::PathBuf;

use crate::exitclass::{Classify, ExitClass};
use crate::nixdb::{Node, Snapshot};
use crate::store_path::{StoreLayout, StorePath, check_base_name};

/// Errors reading the store directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreCheckError {
    /// The store directory cannot be listed.
    #[error("cannot list store directory {}", path.display())]
    ReadStore {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for StoreCheckError {
    /// A failure: a store directory that cannot be listed (a store that is not one is found
    /// earlier, by [`crate::nixdb::NixDbError`]).
    fn exit_class(&self) -> ExitClass {
        ExitClass::Failed
    }
}

/// The entries of the physical store directory.
#[derive(Debug, Clone, Default)]
pub struct StoreEntries {
    /// Entries whose names are store paths.
    pub paths: Vec<StorePath>,
    /// Other entries (lock files, temporary files), except `.links`.
    pub junk: Vec<String>,
}

/// List the store directory once (no `stat` per entry).
pub fn read_store_dir(layout: &StoreLayout) -> Result<StoreEntries, StoreCheckError> {
    let (mut paths, mut junk) = (Vec::new(), Vec::new());
    list_store_dir(
        layout,
        |base| paths.extend(StorePath::from_base_name(base).ok()),
        &mut junk,
    )?;
    Ok(StoreEntries { paths, junk })
}

/// List the store directory once (no `stat` per entry): each entry named like a store path
/// goes to `path`, the other names (except `.links`) to `junk`, sorted.
pub fn list_store_dir(
    layout: &StoreLayout,
    mut path: impl FnMut(&str),
    junk: &mut Vec<String>,
) -> Result<(), StoreCheckError> {
    let err = |source| StoreCheckError::ReadStore {
        path: layout.store_dir.clone(),
        source,
    };
    for e in std::fs::read_dir(&layout.store_dir).map_err(err)? {
        let e = e.map_err(err)?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == ".links" {
            continue;
        }
        match check_base_name(&name) {
            Ok(()) => path(&name),
            Err(_) => junk.push(name.into_owned()),
        }
    }
    // Paths not sorted: 100,000 names would cost more than the listing; callers sort results.
    junk.sort();
    Ok(())
}

/// The store directory's entries resolved against a [`Snapshot`]: which registered paths are
/// on disk (one flag per node), and the entries that are not registered.
#[derive(Debug, Clone, Default)]
pub struct OnDisk {
    present: Vec<bool>,
    /// Entries named like store paths that are not registered, in listing order.
    pub unregistered: Vec<StorePath>,
    /// Other entries (lock files, temporary files), except `.links`.
    pub junk: Vec<String>,
}

impl OnDisk {
    /// Resolve entry base names (store path names, validated) against `snap`.
    pub fn resolve<'a>(
        snap: &Snapshot,
        names: impl IntoIterator<Item = &'a str>,
        junk: Vec<String>,
    ) -> Self {
        let mut out = Self {
            present: vec![false; snap.len()],
            unregistered: Vec::new(),
            junk,
        };
        for name in names {
            match snap.node_of_base(name) {
                Some(n) => out.present[n as usize] = true,
                None => {
                    if let Ok(p) = StorePath::from_base_name(name) {
                        out.unregistered.push(p);
                    }
                }
            }
        }
        out
    }

    /// Resolve a full listing.
    pub fn of_entries(snap: &Snapshot, entries: &StoreEntries) -> Self {
        let names = entries.paths.iter().map(StorePath::base_name);
        Self::resolve(snap, names, entries.junk.clone())
    }

    /// Whether a registered path is on disk.
    pub fn is_present(&self, n: Node) -> bool {
        self.present[n as usize]
    }

    /// The registered paths on disk, in node order.
    pub fn registered(&self) -> impl Iterator<Item = Node> + '_ {
        (0..self.present.len() as Node).filter(|&n| self.present[n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(i: usize) -> StorePath {
        StorePath::from_base_name(&format!("{:0>32}-p{i}", i)).unwrap()
    }

    #[test]
    fn reads_a_store_dir() {
        let dir = tempfile::tempdir().unwrap();
        let l = StoreLayout::chroot(dir.path());
        std::fs::create_dir_all(l.store_dir.join(".links")).unwrap();
        std::fs::create_dir_all(l.store_dir.join(sp(1).base_name())).unwrap();
        std::fs::write(l.store_dir.join("x.lock"), b"").unwrap();
        let e = read_store_dir(&l).unwrap();
        assert_eq!(e.paths, vec![sp(1)]);
        assert_eq!(e.junk.len(), 1);
        assert_eq!(e.junk, vec!["x.lock".to_owned()]);
        assert!(read_store_dir(&StoreLayout::chroot("/nonexistent")).is_err());
    }
}
