//! `up --watch`: noticing edits of a composition. A [`Watcher`] has an inotify watch on the
//! composition's directory and its subdirectories (those made later too); [`Watcher::poll`]
//! never blocks and returns the paths written, made, moved or removed since the last call,
//! leaving out `result*` links and dot files (editors' swap files, `.git`). A [`Debounce`]
//! (pure) turns a burst of such changes (an editor's write-rename-chmod) into one: the burst is
//! over once nothing changed for a quiet period.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// At most this many directories are watched (a composition's tree is small).
const MAX_DIRS: usize = 512;

/// Why the directory cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {} for changes (inotify)", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether a change of the file named `name` is left out: `result*` (build links) and dot files.
pub fn ignored(name: &str) -> bool {
    name.starts_with('.') || name.starts_with("result")
}

/// Watches a directory tree for changes.
#[derive(Debug)]
pub struct Watcher {
    inotify: Inotify,
    dirs: BTreeMap<WatchDescriptor, PathBuf>,
    buf: Vec<u8>,
}

fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
}

impl Watcher {
    /// Watch `dir` and every directory below it that is not ignored.
    pub fn new(dir: &Path) -> Result<Self, WatchError> {
        let inotify = Inotify::init().map_err(|source| WatchError::Watch {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut w = Self {
            inotify,
            dirs: BTreeMap::new(),
            buf: vec![0; 64 * 1024],
        };
        w.add_tree(dir)?;
        Ok(w)
    }

    fn add_tree(&mut self, dir: &Path) -> Result<(), WatchError> {
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            if self.dirs.len() >= MAX_DIRS {
                tracing::warn!("watching only the first {MAX_DIRS} directories");
                break;
            }
            let wd =
                self.inotify
                    .watches()
                    .add(&d, mask())
                    .map_err(|source| WatchError::Watch {
                        path: d.clone(),
                        source,
                    })?;
            self.dirs.insert(wd, d.clone());
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !ignored(&name) && e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
        Ok(())
    }

    /// The changed paths since the last call (none if nothing changed); never blocks.
    pub fn poll(&mut self) -> Result<Vec<PathBuf>, WatchError> {
        let mut out = Vec::new();
        let mut new_dirs = Vec::new();
        loop {
            let events = match self.inotify.read_events(&mut self.buf) {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(source) => {
                    return Err(WatchError::Watch {
                        path: self.dirs.values().next().cloned().unwrap_or_default(),
                        source,
                    });
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name) else {
                    continue;
                };
                let name = name.to_string_lossy();
                if ignored(&name) {
                    continue;
                }
                let path = dir.join(&*name);
                if ev.mask.contains(EventMask::ISDIR)
                    && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
                {
                    new_dirs.push(path.clone());
                }
                out.push(path);
            }
            if !any {
                break;
            }
        }
        for d in new_dirs {
            self.add_tree(&d)?;
        }
        Ok(out)
    }
}

impl std::os::fd::AsFd for Watcher {
    /// Readable when changes are waiting for [`Watcher::poll`].
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

/// Collects changes until none came for a quiet period.
#[derive(Debug, Default)]
pub struct Debounce {
    pending: BTreeSet<PathBuf>,
    last: Option<Instant>,
}

impl Debounce {
    /// Note `paths` changed at `now` (nothing when empty).
    pub fn push(&mut self, paths: Vec<PathBuf>, now: Instant) {
        if !paths.is_empty() {
            self.pending.extend(paths);
            self.last = Some(now);
        }
    }

    /// When the burst being collected is over, if one is: the time to wait until.
    pub fn due(&self, quiet: Duration) -> Option<Instant> {
        self.last.map(|l| l + quiet)
    }

    /// The burst's paths once nothing changed for `quiet` (then it starts anew), else `None`.
    pub fn take(&mut self, now: Instant, quiet: Duration) -> Option<Vec<PathBuf>> {
        let last = self.last?;
        if now.duration_since(last) < quiet {
            return None;
        }
        self.last = None;
        Some(std::mem::take(&mut self.pending).into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_links_and_dot_files_are_ignored() {
        for (name, want) in [
            ("result", true),
            ("result-2", true),
            (".drydock.nix.swp", true),
            (".git", true),
            ("drydock.nix", false),
            ("server.nix", false),
            ("myresult.nix", false),
        ] {
            assert_eq!(ignored(name), want, "{name}");
        }
    }

    #[test]
    fn a_burst_is_one_change_after_the_quiet_period() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debounce::default();
        assert_eq!(d.take(t, ms(200)), None, "nothing changed");
        assert_eq!(d.due(ms(200)), None);
        d.push(vec![PathBuf::from("/a")], t);
        assert_eq!(d.due(ms(200)), Some(t + ms(200)));
        d.push(vec![], t + ms(100));
        d.push(vec![PathBuf::from("/b"), PathBuf::from("/a")], t + ms(150));
        assert_eq!(d.take(t + ms(300), ms(200)), None, "still in the burst");
        assert_eq!(
            d.take(t + ms(350), ms(200)),
            Some(vec![PathBuf::from("/a"), PathBuf::from("/b")])
        );
        assert_eq!(d.take(t + ms(1000), ms(200)), None, "taken once");
    }

    #[test]
    fn writes_are_seen_and_ignored_names_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(dir.path()).unwrap();
        assert!(w.poll().unwrap().is_empty());
        std::fs::write(dir.path().join(".swap"), "x").unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.path().join("result")).unwrap();
        std::fs::write(dir.path().join("drydock.nix"), "{ }").unwrap();
        // A directory made later is watched too.
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let t = Instant::now();
        let mut seen = BTreeSet::new();
        while t.elapsed() < Duration::from_secs(5) && seen.len() < 2 {
            seen.extend(w.poll().unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        let want: BTreeSet<PathBuf> = [dir.path().join("drydock.nix"), dir.path().join("sub")]
            .into_iter()
            .collect();
        assert_eq!(seen, want);
        std::fs::write(dir.path().join("sub/machine.nix"), "{ }").unwrap();
        let t = Instant::now();
        let mut seen = Vec::new();
        while t.elapsed() < Duration::from_secs(5) && seen.is_empty() {
            seen.extend(w.poll().unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            seen.contains(&dir.path().join("sub/machine.nix")),
            "{seen:?}"
        );
    }
}
