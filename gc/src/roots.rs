//! GC roots, found the way Nix finds them: the `gcroots` tree (direct links, indirect links
//! such as `auto/`, and files named after store paths), the `profiles` tree, runtime roots
//! from `/proc` (executables, working directories, open files, memory maps, environments of
//! every process) and the temporary roots of live Nix processes. Nothing here writes.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::exitclass::{Classify, ExitClass};
use crate::store_path::{StoreLayout, StorePath};

/// Errors while looking for roots. Unreadable individual entries are skipped, as Nix does;
/// only an unreadable roots directory itself is an error.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// A roots directory exists but cannot be read.
    #[error("cannot read GC roots directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for RootsError {
    /// A failure: the roots directories are Nix's, not the user's input.
    fn exit_class(&self) -> ExitClass {
        ExitClass::Failed
    }
}

/// Where a root comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RootKind {
    /// A symlink or file in `gcroots` or `profiles` pointing into the store.
    Direct,
    /// A symlink elsewhere, registered through a link in `gcroots` (e.g. `./result`).
    Indirect,
    /// A running process uses the path.
    Runtime,
    /// A live Nix process registered the path as a temporary root.
    Temporary,
}

/// One root: a store path kept alive and the link or file that keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// The store path held.
    pub path: StorePath,
    /// The symlink, file or `/proc` entry that holds it.
    pub link: PathBuf,
    /// What kind of root it is.
    pub kind: RootKind,
}

/// Find every root of the store: gcroots, profiles, runtime and temporary roots.
pub fn find_roots(layout: &StoreLayout) -> Result<Vec<Root>, RootsError> {
    let mut roots = find_link_roots(layout)?;
    roots.extend(find_runtime_roots(layout, Path::new("/proc")));
    roots.extend(find_temp_roots(layout));
    Ok(roots)
}

/// Roots in `gcroots` and `profiles` only.
pub fn find_link_roots(layout: &StoreLayout) -> Result<Vec<Root>, RootsError> {
    let mut roots = Vec::new();
    for dir in ["gcroots", "profiles"] {
        let p = layout.state_dir.join(dir);
        match fs::symlink_metadata(&p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => {
                fs::read_dir(&p).map_err(|source| RootsError::ReadDir {
                    path: p.clone(),
                    source,
                })?;
            }
            Ok(_) => {}
        }
        find_in(layout, &p, &mut roots);
    }
    Ok(roots)
}

fn store_path_of(layout: &StoreLayout, target: &str) -> Option<StorePath> {
    StorePath::parse_prefix(&layout.logical_store_dir, target).ok()
}

/// Nix's `findRoots`, for one entry.
fn find_in(layout: &StoreLayout, path: &Path, roots: &mut Vec<Root>) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        let Ok(rd) = fs::read_dir(path) else {
            tracing::debug!("cannot read {}", path.display());
            return;
        };
        for e in rd.flatten() {
            find_in(layout, &e.path(), roots);
        }
    } else if ft.is_symlink() {
        let Ok(target) = fs::read_link(path) else {
            return;
        };
        let t = target.to_string_lossy();
        if layout.is_in_store(&t) {
            if let Some(sp) = store_path_of(layout, &t) {
                roots.push(Root {
                    path: sp,
                    link: path.to_owned(),
                    kind: RootKind::Direct,
                });
            }
            return;
        }
        // An indirect root: the link names another symlink, which points into the store.
        let target = if target.is_absolute() {
            target
        } else {
            path.parent().unwrap_or(Path::new("/")).join(target)
        };
        let Ok(m2) = fs::symlink_metadata(&target) else {
            return;
        };
        if !m2.file_type().is_symlink() {
            return;
        }
        let Ok(target2) = fs::read_link(&target) else {
            return;
        };
        let t2 = target2.to_string_lossy();
        if layout.is_in_store(&t2)
            && let Some(sp) = store_path_of(layout, &t2)
        {
            roots.push(Root {
                path: sp,
                link: target,
                kind: RootKind::Indirect,
            });
        }
    } else if ft.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(sp) = name.and_then(|n| StorePath::from_base_name(&n).ok()) {
            roots.push(Root {
                path: sp,
                link: path.to_owned(),
                kind: RootKind::Direct,
            });
        }
    }
}

/// Store paths named in a string the way Nix scans environments:
/// `STORE_DIR/[0-9a-z]+[0-9a-zA-Z+-._?=]*`.
fn scan_store_refs(store_dir: &str, text: &[u8], out: &mut Vec<String>) {
    let pat = format!("{store_dir}/");
    let pat = pat.as_bytes();
    let mut i = 0;
    while i + pat.len() <= text.len() {
        if &text[i..i + pat.len()] != pat {
            i += 1;
            continue;
        }
        let start = i + pat.len();
        let mut end = start;
        if end < text.len() && (text[end].is_ascii_digit() || text[end].is_ascii_lowercase()) {
            end += 1;
            while end < text.len()
                && (text[end].is_ascii_alphanumeric() || b"+-._?=".contains(&text[end]))
            {
                end += 1;
            }
            out.push(String::from_utf8_lossy(&text[i..end]).into_owned());
            i = end;
        } else {
            i = start;
        }
    }
}

/// Runtime roots: what running processes use, found through a `/proc`-like directory.
pub fn find_runtime_roots(layout: &StoreLayout, proc_dir: &Path) -> Vec<Root> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let Ok(rd) = fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let pd = e.path();
        for l in ["exe", "cwd"] {
            let p = pd.join(l);
            if let Ok(t) = fs::read_link(&p) {
                found.push((t.to_string_lossy().into_owned(), p));
            }
        }
        if let Ok(fds) = fs::read_dir(pd.join("fd")) {
            for fd in fds.flatten() {
                let p = fd.path();
                if let Ok(t) = fs::read_link(&p) {
                    found.push((t.to_string_lossy().into_owned(), p));
                }
            }
        }
        let maps = pd.join("maps");
        if let Ok(text) = fs::read(&maps) {
            for line in text.split(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(line);
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() == 6 && fields[5].starts_with('/') {
                    found.push((fields[5].to_owned(), maps.clone()));
                }
            }
        }
        let env = pd.join("environ");
        if let Ok(text) = fs::read(&env) {
            let mut refs = Vec::new();
            scan_store_refs(&layout.logical_store_dir, &text, &mut refs);
            found.extend(refs.into_iter().map(|r| (r, env.clone())));
        }
    }
    for f in [
        "sys/kernel/modprobe",
        "sys/kernel/fbsplash",
        "sys/kernel/poweroff_cmd",
    ] {
        let p = proc_dir.join(f);
        if let Ok(t) = fs::read_to_string(&p) {
            found.push((t, p));
        }
    }
    let mut roots = Vec::new();
    for (target, link) in found {
        if !layout.is_in_store(&target) {
            continue;
        }
        if let Some(sp) = store_path_of(layout, &target) {
            roots.push(Root {
                path: sp,
                link,
                kind: RootKind::Runtime,
            });
        }
    }
    roots
}

/// Temporary roots of live Nix processes (`temproots/PID`, NUL-separated paths). A file
/// whose owner died (its lock can be taken) is ignored, as Nix ignores it.
pub fn find_temp_roots(layout: &StoreLayout) -> Vec<Root> {
    let dir = layout.state_dir.join("temproots");
    let Ok(rd) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut roots = Vec::new();
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let p = e.path();
        let Ok(mut f) = fs::OpenOptions::new().read(true).write(true).open(&p) else {
            continue;
        };
        if crate::sys::try_lock_exclusive(&f) {
            // The owner is gone; the lock is released when `f` closes.
            continue;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            continue;
        }
        for item in buf.split(|&b| b == 0) {
            let s = String::from_utf8_lossy(item);
            if let Ok(sp) = layout.parse(&s) {
                roots.push(Root {
                    path: sp,
                    link: p.clone(),
                    kind: RootKind::Temporary,
                });
            }
        }
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const A: &str = "00000000000000000000000000000000-a";
    const B: &str = "11111111111111111111111111111111-b";
    const C: &str = "22222222222222222222222222222222-c";
    const D: &str = "33333333333333333333333333333333-d";

    #[test]
    fn gcroots_tree_direct_indirect_files_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path());
        let g = layout.gcroots_dir();
        fs::create_dir_all(g.join("auto")).unwrap();
        fs::create_dir_all(g.join("per-user/x")).unwrap();
        fs::create_dir_all(layout.state_dir.join("profiles")).unwrap();
        // Direct, pointing below a store path.
        symlink(format!("/nix/store/{A}/bin/sh"), g.join("per-user/x/a")).unwrap();
        // Indirect: auto/ link -> ./result -> store.
        let result = dir.path().join("result");
        symlink(format!("/nix/store/{B}"), &result).unwrap();
        symlink(&result, g.join("auto/xyz")).unwrap();
        // Indirect link whose target is gone: skipped.
        symlink(dir.path().join("gone"), g.join("auto/stale")).unwrap();
        // A plain file named after a store path.
        fs::write(g.join(C), b"").unwrap();
        // A file with another name: ignored.
        fs::write(g.join("README"), b"").unwrap();
        // Profiles.
        symlink(
            format!("/nix/store/{D}"),
            layout.state_dir.join("profiles/p-1-link"),
        )
        .unwrap();
        // A link to a non-store place that is not a symlink: ignored.
        symlink("/", g.join("rootdir")).unwrap();

        let mut roots = find_link_roots(&layout).unwrap();
        roots.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<(&str, RootKind)> = roots
            .iter()
            .map(|r| (r.path.base_name(), r.kind.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (A, RootKind::Direct),
                (B, RootKind::Indirect),
                (C, RootKind::Direct),
                (D, RootKind::Direct)
            ]
        );
        assert_eq!(roots[1].link, result);
    }

    #[test]
    fn runtime_roots_from_fake_proc() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path().join("store"));
        let proc_dir = dir.path().join("proc");
        let p = proc_dir.join("42");
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::create_dir_all(proc_dir.join("self-not-a-pid")).unwrap();
        symlink(format!("/nix/store/{A}/bin/x"), p.join("exe")).unwrap();
        symlink("/tmp", p.join("cwd")).unwrap();
        symlink(format!("/nix/store/{B}"), p.join("fd/3")).unwrap();
        fs::write(
            p.join("maps"),
            format!(
                "7f00-7f01 r-xp 00000000 08:01 123 /nix/store/{C}/lib/libc.so\n\
                 7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/x.so\n"
            ),
        )
        .unwrap();
        fs::write(
            p.join("environ"),
            format!("PATH=/nix/store/{D}/bin:/bin\0X=/nix/store/\0Y=/nix/store/Zbad\0"),
        )
        .unwrap();
        let mut roots = find_runtime_roots(&layout, &proc_dir);
        roots.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<&str> = roots.iter().map(|r| r.path.base_name()).collect();
        assert_eq!(got, vec![A, B, C, D]);
        assert!(roots.iter().all(|r| r.kind == RootKind::Runtime));
    }

    #[test]
    fn scan_matches_nix_regex() {
        let mut v = Vec::new();
        scan_store_refs(
            "/nix/store",
            b"a=/nix/store/abc-d.e:/nix/store/-x /nix/store/q",
            &mut v,
        );
        assert_eq!(v, vec!["/nix/store/abc-d.e", "/nix/store/q"]);
    }

    #[test]
    fn temp_roots_of_live_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path());
        let t = layout.state_dir.join("temproots");
        fs::create_dir_all(&t).unwrap();
        fs::write(t.join("1"), format!("/nix/store/{A}\0/nix/store/{B}\0")).unwrap();
        fs::write(t.join("2"), format!("/nix/store/{C}\0")).unwrap();
        // A live owner holds the lock of file 1 (another open file description).
        let held = fs::File::open(t.join("1")).unwrap();
        assert!(crate::sys::try_lock_exclusive(&held));
        let roots = find_temp_roots(&layout);
        let got: Vec<&str> = roots.iter().map(|r| r.path.base_name()).collect();
        assert_eq!(got, vec![A, B]);
        drop(held);
        assert!(find_temp_roots(&layout).is_empty());
    }
}
