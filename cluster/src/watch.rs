//! `up --watch`: noticing edits of a composition. A [`Watcher`] has an inotify watch on the
//! composition's directory and its subdirectories (those made later too); [`Watcher::poll`]
//! never blocks and returns the paths written, made, moved or removed since the last call,
//! leaving out `result*` links and dot files (editors' swap files, `.git`). A [`Recorder`]
//! notes which files under that directory an evaluation opened (inotify's open events while
//! `nix-instantiate` runs: the composition, its imports, the files it reads or copies to the
//! store); [`triggers`] (pure) lets through only changes of those, so that a file the evaluation
//! never read (`up --watch > up.log` in the composition's folder: drydock's own output) does not
//! reload. A [`Debounce`] (pure) turns a burst of changes (an editor's write-rename-chmod) into
//! one: the burst is over once nothing changed for a quiet period.

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

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Written, or its attributes changed.
    Written,
    /// Made, or moved there (an editor's write-and-rename).
    Created,
    /// Removed, or moved away.
    Removed,
}

/// One change [`Watcher::poll`] saw.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    pub path: PathBuf,
    pub kind: ChangeKind,
}

impl ChangeKind {
    fn of(mask: EventMask) -> Self {
        if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            Self::Created
        } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
            Self::Removed
        } else {
            Self::Written
        }
    }
}

/// What an evaluation read under the composition's directory: the files (and directories) it
/// opened. Not `complete` when there were more directories than are watched, or more events
/// than inotify queues: then nothing can be ruled out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    pub paths: BTreeSet<PathBuf>,
    pub complete: bool,
}

/// Whether `change` calls for a reload (pure). Never for a path under `ignore` (drydock's own
/// files: a state dir inside the composition's directory, the files its output goes to).
/// Otherwise, when what the last evaluation read is not known (`None`, or not complete), every
/// change does (as before any evaluation was recorded). Else a change of a file the evaluation
/// read does, and a file made in or removed from a directory it read (`readDir`); after an
/// evaluation that failed, any file made does too (it may be the missing import).
pub fn triggers(change: &Change, reads: Option<&Reads>, failed: bool, ignore: &[PathBuf]) -> bool {
    if ignore.iter().any(|i| change.path.starts_with(i)) {
        return false;
    }
    let Some(reads) = reads.filter(|r| r.complete) else {
        return true;
    };
    if reads.paths.contains(&change.path) {
        return true;
    }
    let listed = change
        .path
        .parent()
        .is_some_and(|d| reads.paths.contains(d));
    match change.kind {
        ChangeKind::Written => false,
        ChangeKind::Created => listed || failed,
        ChangeKind::Removed => listed,
    }
}

/// Watches a directory tree for changes.
#[derive(Debug)]
pub struct Watcher {
    inotify: Inotify,
    dirs: BTreeMap<WatchDescriptor, PathBuf>,
    /// Directories watched without the ones below them ([`Watcher::add_dir`]).
    shallow: BTreeSet<WatchDescriptor>,
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
            shallow: BTreeSet::new(),
            buf: vec![0; 64 * 1024],
        };
        w.add_tree(dir)?;
        Ok(w)
    }

    /// Watch `dir` and the directories below it (not ignored), at most [`MAX_DIRS`] in all:
    /// whether every one is watched.
    fn add_tree(&mut self, dir: &Path) -> Result<bool, WatchError> {
        add_tree(&self.inotify, &mut self.dirs, dir, mask())
    }

    /// Watch `dir` too, but not the directories below it (a file's folder: `drydock test
    /// --watch`'s script outside the composition's directory).
    pub fn add_dir(&mut self, dir: &Path) -> Result<(), WatchError> {
        let wd = self
            .inotify
            .watches()
            .add(dir, mask())
            .map_err(|source| WatchError::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        self.dirs.insert(wd.clone(), dir.to_path_buf());
        self.shallow.insert(wd);
        Ok(())
    }

    /// The changes since the last call (none if nothing changed); never blocks.
    pub fn poll(&mut self) -> Result<Vec<Change>, WatchError> {
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
                    && !self.shallow.contains(&ev.wd)
                {
                    new_dirs.push(path.clone());
                }
                out.push(Change {
                    path,
                    kind: ChangeKind::of(ev.mask),
                });
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

/// Watch `dir` and the directories below it that are not ignored with `mask`, at most
/// [`MAX_DIRS`] in all (`dirs` holds them): whether every one is watched.
fn add_tree(
    inotify: &Inotify,
    dirs: &mut BTreeMap<WatchDescriptor, PathBuf>,
    dir: &Path,
    mask: WatchMask,
) -> Result<bool, WatchError> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if dirs.len() >= MAX_DIRS {
            tracing::warn!("watching only the first {MAX_DIRS} directories");
            return Ok(false);
        }
        let wd = inotify
            .watches()
            .add(&d, mask)
            .map_err(|source| WatchError::Watch {
                path: d.clone(),
                source,
            })?;
        dirs.insert(wd, d.clone());
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
    Ok(true)
}

/// Notes the files and directories opened under a directory tree while it lives: started just
/// before an evaluation, finished just after it ([`Recorder::finish`]).
#[derive(Debug)]
pub struct Recorder {
    inotify: Inotify,
    dirs: BTreeMap<WatchDescriptor, PathBuf>,
    complete: bool,
}

impl Recorder {
    /// Start noting what is opened under `dir`.
    pub fn start(dir: &Path) -> Result<Self, WatchError> {
        let mut inotify = Inotify::init().map_err(|source| WatchError::Watch {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut dirs = BTreeMap::new();
        let complete = add_tree(&inotify, &mut dirs, dir, WatchMask::OPEN)?;
        // Listing the tree to watch it opened its directories: those opens are ours.
        let mut buf = vec![0u8; 64 * 1024];
        while inotify
            .read_events(&mut buf)
            .is_ok_and(|mut ev| ev.next().is_some())
        {}
        Ok(Self {
            inotify,
            dirs,
            complete,
        })
    }

    /// What was opened since [`Recorder::start`] (the watches end here).
    pub fn finish(mut self) -> Reads {
        let mut reads = Reads {
            paths: BTreeSet::new(),
            complete: self.complete,
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let events = match self.inotify.read_events(&mut buf) {
                Ok(ev) => ev,
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!("reading what the evaluation opened: {e}");
                        reads.complete = false;
                    }
                    break;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    reads.complete = false;
                }
                let Some(dir) = self.dirs.get(&ev.wd) else {
                    continue;
                };
                // No name: the watched directory itself was opened (listed).
                reads.paths.insert(match ev.name {
                    Some(name) => dir.join(name),
                    None => dir.clone(),
                });
            }
            if !any {
                break;
            }
        }
        reads
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
    fn only_changes_of_what_the_evaluation_read_trigger_a_reload() {
        let p = PathBuf::from;
        let reads = Reads {
            paths: [p("/c/drydock.nix"), p("/c/sub/m.nix"), p("/c/hosts.d")]
                .into_iter()
                .collect(),
            complete: true,
        };
        let partial = Reads {
            complete: false,
            ..reads.clone()
        };
        let ignore = [p("/c/state"), p("/c/up.log")];
        use ChangeKind::*;
        // (path, kind, reads, last evaluation failed) → reload
        let cases: [(&str, ChangeKind, Option<&Reads>, bool, bool); 15] = [
            ("/c/drydock.nix", Written, Some(&reads), false, true),
            ("/c/drydock.nix", Created, Some(&reads), false, true),
            ("/c/drydock.nix", Removed, Some(&reads), false, true),
            ("/c/sub/m.nix", Written, Some(&reads), false, true),
            // Never read: drydock's output, notes, a new file.
            ("/c/up.log", Written, Some(&reads), false, false),
            ("/c/notes.txt", Written, Some(&reads), false, false),
            ("/c/new.nix", Created, Some(&reads), false, false),
            // A listed directory's entries come and go.
            ("/c/hosts.d/a", Created, Some(&reads), false, true),
            ("/c/hosts.d/a", Removed, Some(&reads), false, true),
            ("/c/hosts.d/a", Written, Some(&reads), false, false),
            // After a failed evaluation a new file may be the missing import.
            ("/c/new.nix", Created, Some(&reads), true, true),
            ("/c/notes.txt", Written, Some(&reads), true, false),
            // Not known what was read: every change, but never drydock's own files.
            ("/c/notes.txt", Written, None, false, true),
            ("/c/notes.txt", Written, Some(&partial), false, true),
            ("/c/state/vms/x/console.log", Written, None, false, false),
        ];
        for (path, kind, reads, failed, want) in cases {
            let c = Change {
                path: p(path),
                kind,
            };
            assert_eq!(
                triggers(&c, reads, failed, &ignore),
                want,
                "{path} {kind:?} failed={failed} reads={}",
                reads.map_or("none", |r| if r.complete { "all" } else { "partial" })
            );
        }
        assert!(!triggers(
            &Change {
                path: p("/c/up.log"),
                kind: Written
            },
            None,
            true,
            &ignore
        ));
    }

    #[test]
    fn the_recorder_notes_what_was_opened_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        for f in ["drydock.nix", "sub/m.nix", "notes.txt"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        // Opened before (as a shell's `> up.log` does), written while recording.
        let mut log = std::fs::File::create(d.join("up.log")).unwrap();
        let r = Recorder::start(d).unwrap();
        std::fs::read(d.join("drydock.nix")).unwrap();
        std::fs::read(d.join("sub/m.nix")).unwrap();
        std::io::Write::write_all(&mut log, b"drydock: ...").unwrap();
        let reads = r.finish();
        std::fs::read(d.join("notes.txt")).unwrap();
        assert!(reads.complete);
        let want: BTreeSet<PathBuf> = [d.join("drydock.nix"), d.join("sub/m.nix")]
            .into_iter()
            .collect();
        assert_eq!(reads.paths, want);
        // A directory listed while recording is noted as itself.
        let r = Recorder::start(d).unwrap();
        let _ = std::fs::read_dir(d.join("sub")).unwrap().count();
        assert!(r.finish().paths.contains(&d.join("sub")));
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
            seen.extend(w.poll().unwrap().into_iter().map(|c| c.path));
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
            seen.extend(w.poll().unwrap().into_iter().map(|c| c.path));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            seen.contains(&dir.path().join("sub/machine.nix")),
            "{seen:?}"
        );
    }
}
