//! Disk usage with hard links counted once: after `nix-store --optimise` most files are
//! links into `.links`, so a byte count must count an inode once, and the space a deletion
//! frees is only that of inodes whose every link is being deleted (a `.links` entry counts
//! as a link, and Nix removes it once it is the last one).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::exitclass::{Classify, ExitClass};
use crate::store_path::StoreLayout;

/// Errors measuring disk usage.
#[derive(Debug, thiserror::Error)]
pub enum DuError {
    /// A directory could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for DuError {
    /// A failure: a directory that cannot be read while measuring.
    fn exit_class(&self) -> ExitClass {
        ExitClass::Failed
    }
}

/// Inodes seen while walking, with their size on disk and link count.
///
/// A set made by [`InodeSet::walk_parallel`] walks trees that do not overlap (distinct store
/// paths): there an inode that cannot be reached twice (a directory, or a file with one
/// link) is only counted, and only inodes with several links are remembered one by one.
#[derive(Debug, Default, Clone)]
pub struct InodeSet {
    /// (dev, ino) -> (bytes on disk, st_nlink, links seen in the walk, is_dir).
    inodes: HashMap<(u64, u64), (u64, u64, u64, bool)>,
    /// The walked trees do not overlap: see above.
    disjoint: bool,
    /// Bytes and number of the inodes only counted (they are freed with their one link).
    unique_bytes: u64,
    unique: usize,
}

impl InodeSet {
    /// Walk `path` (not following symlinks) and add everything under it.
    pub fn add_tree(&mut self, path: &Path) -> Result<(), DuError> {
        let Ok(m) = std::fs::symlink_metadata(path) else {
            return Ok(());
        };
        self.add(&m);
        if m.is_dir() {
            self.walk_dir(path)?;
        }
        Ok(())
    }

    fn add(&mut self, m: &std::fs::Metadata) {
        if self.disjoint && (m.is_dir() || m.nlink() == 1) {
            self.unique_bytes += m.blocks() * 512;
            self.unique += 1;
            return;
        }
        let e = self.inodes.entry((m.dev(), m.ino())).or_insert((
            m.blocks() * 512,
            m.nlink(),
            0,
            m.is_dir(),
        ));
        e.2 += 1;
    }

    fn walk_dir(&mut self, dir: &Path) -> Result<(), DuError> {
        let rd = std::fs::read_dir(dir).map_err(|source| DuError::Read {
            path: dir.to_owned(),
            source,
        })?;
        for e in rd {
            let e = e.map_err(|source| DuError::Read {
                path: dir.to_owned(),
                source,
            })?;
            let Ok(m) = e.metadata() else { continue };
            self.add(&m);
            if m.is_dir() {
                self.walk_dir(&e.path())?;
            }
        }
        Ok(())
    }

    /// Add another walk's inodes (links seen add up).
    pub fn merge(&mut self, other: InodeSet) {
        self.unique_bytes += other.unique_bytes;
        self.unique += other.unique;
        for (k, v) in other.inodes {
            self.inodes.entry(k).and_modify(|e| e.2 += v.2).or_insert(v);
        }
    }

    /// Walk `count` trees that do not overlap (distinct store paths), the `i`th at
    /// `path_of(i)`, on `threads` threads, and merge the result.
    pub fn walk_parallel(
        count: usize,
        threads: usize,
        path_of: impl Fn(usize) -> PathBuf + Sync,
    ) -> Result<Self, DuError> {
        let threads = threads.clamp(1, 8);
        let chunk = count.div_ceil(threads).max(1);
        let path_of = &path_of;
        let parts: Vec<Result<InodeSet, DuError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..count)
                .step_by(chunk)
                .map(|start| {
                    s.spawn(move || {
                        let mut set = InodeSet {
                            disjoint: true,
                            ..InodeSet::default()
                        };
                        for i in start..(start + chunk).min(count) {
                            set.add_tree(&path_of(i))?;
                        }
                        Ok(set)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut all = InodeSet {
            disjoint: true,
            ..InodeSet::default()
        };
        for p in parts {
            all.merge(p?);
        }
        Ok(all)
    }

    /// Bytes on disk, each inode once.
    pub fn bytes(&self) -> u64 {
        self.unique_bytes + self.inodes.values().map(|v| v.0).sum::<u64>()
    }

    /// Bytes that deleting everything walked would free: inodes all of whose links were
    /// walked, counting a `.links` entry (from `links`) as walked too.
    pub fn freeable_bytes(&self, links: &HashSet<u64>) -> u64 {
        self.unique_bytes
            + self
                .inodes
                .iter()
                .filter(|((_, ino), (_, nlink, seen, is_dir))| {
                    *is_dir || seen + u64::from(links.contains(ino)) >= *nlink
                })
                .map(|(_, v)| v.0)
                .sum::<u64>()
    }

    /// Number of distinct inodes.
    pub fn len(&self) -> usize {
        self.unique + self.inodes.len()
    }

    /// Whether nothing was walked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Inode numbers of the store's `.links` directory (from the directory entries alone).
pub fn links_inodes(layout: &StoreLayout) -> HashSet<u64> {
    let mut s = HashSet::new();
    if let Ok(rd) = std::fs::read_dir(layout.store_dir.join(".links")) {
        for e in rd.flatten() {
            s.insert(e.ino());
        }
    }
    s
}

/// Bytes on disk of some trees, each inode counted once.
pub fn disk_usage(paths: &[PathBuf]) -> Result<u64, DuError> {
    let mut s = InodeSet::default();
    for p in paths {
        s.add_tree(p)?;
    }
    Ok(s.bytes())
}

/// Bytes deleting these trees would free (see [`InodeSet::freeable_bytes`]).
pub fn freeable(layout: &StoreLayout, paths: &[PathBuf]) -> Result<u64, DuError> {
    let mut s = InodeSet::default();
    for p in paths {
        s.add_tree(p)?;
    }
    Ok(s.freeable_bytes(&links_inodes(layout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_counted_once_and_freeable_only_when_all_links_go() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("f"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::hard_link(a.join("f"), b.join("f")).unwrap();
        std::fs::hard_link(a.join("f"), a.join("g")).unwrap();
        let file_bytes = std::fs::metadata(a.join("f")).unwrap().blocks() * 512;
        let dir_bytes = std::fs::metadata(&a).unwrap().blocks() * 512;
        let only_a = disk_usage(std::slice::from_ref(&a)).unwrap();
        assert_eq!(
            only_a,
            file_bytes + dir_bytes,
            "two links in a, counted once"
        );
        let both = disk_usage(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(both, file_bytes + 2 * dir_bytes);
        let mut s = InodeSet::default();
        s.add_tree(&a).unwrap();
        assert_eq!(
            s.freeable_bytes(&HashSet::new()),
            dir_bytes,
            "b still links the file"
        );
        s.add_tree(&b).unwrap();
        assert_eq!(
            s.freeable_bytes(&HashSet::new()),
            file_bytes + 2 * dir_bytes
        );
        // A further link (as in .links) that is not being deleted but is known: freed, since
        // Nix drops .links entries with no other link.
        let links = dir.path().join("links");
        std::fs::create_dir_all(&links).unwrap();
        std::fs::hard_link(a.join("f"), links.join("h")).unwrap();
        let mut s = InodeSet::default();
        s.add_tree(&a).unwrap();
        s.add_tree(&b).unwrap();
        assert_eq!(s.freeable_bytes(&HashSet::new()), 2 * dir_bytes);
        let ino = std::fs::metadata(a.join("f")).unwrap().ino();
        assert_eq!(s.freeable_bytes(&[ino].into()), file_bytes + 2 * dir_bytes);
        assert_eq!(s.len(), 3);
        // The parallel walk sees the same links.
        let trees = [a.clone(), b.clone()];
        let p = InodeSet::walk_parallel(2, 2, |i| trees[i].clone()).unwrap();
        assert_eq!(p.freeable_bytes(&[ino].into()), file_bytes + 2 * dir_bytes);
        assert_eq!(p.freeable_bytes(&HashSet::new()), 2 * dir_bytes);
    }
}
