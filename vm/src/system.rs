//! Reading a NixOS-shaped system ("toplevel": `kernel`, `initrd`, `init`, `kernel-params`) out of
//! a store that may be a chroot store: links inside the store name logical `/nix/store/...`
//! paths, which are followed under the store's physical directory.

use std::path::{Component, Path, PathBuf};

use drydock_gc::{StoreLayout, StorePath};

/// What booting a system needs, resolved to physical files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemBoot {
    /// The toplevel's store path.
    pub toplevel: StorePath,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `$(cat kernel-params) init=TOPLEVEL/init` (logical path).
    pub cmdline: String,
}

/// Why a path is not a bootable system.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{path}: not in the Nix store {store}")]
    NotInStore { path: String, store: String },
    #[error("{path}: does not exist (looked at {})", physical.display())]
    Missing { path: String, physical: PathBuf },
    #[error("{toplevel} is not a NixOS-shaped system: it has no {what}")]
    NotASystem {
        toplevel: String,
        what: &'static str,
    },
    #[error("{path}: too many levels of symbolic links")]
    Loop { path: String },
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SystemError {
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }
}

/// Lexically normalise an absolute path (`.` and `..`), as the kernel does for link targets.
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// The physical file behind a logical path, following links (absolute targets are logical, so
/// they are re-rooted under the store's root). Every component is followed.
pub fn resolve_logical(layout: &StoreLayout, logical: &str) -> Result<PathBuf, SystemError> {
    let physical_of = |l: &Path| -> PathBuf {
        match &layout.root {
            Some(root) => root.join(l.strip_prefix("/").unwrap_or(l)),
            None => l.to_path_buf(),
        }
    };
    let mut pending: Vec<std::ffi::OsString> = Path::new(logical)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .rev()
        .collect();
    let mut cur = PathBuf::from("/");
    let mut hops = 0;
    while let Some(next) = pending.pop() {
        if next == ".." {
            cur.pop();
            continue;
        }
        let candidate = cur.join(&next);
        let phys = physical_of(&candidate);
        match std::fs::symlink_metadata(&phys) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(SystemError::Loop {
                        path: logical.to_string(),
                    });
                }
                let target = std::fs::read_link(&phys).map_err(|source| SystemError::Io {
                    path: phys.clone(),
                    source,
                })?;
                let target = if target.is_absolute() {
                    target
                } else {
                    cur.join(target)
                };
                let target = normalise(&target);
                // Restart from the root with the target's components, then the rest.
                let mut comps: Vec<std::ffi::OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        _ => None,
                    })
                    .collect();
                comps.reverse();
                pending.extend(comps);
                cur = PathBuf::from("/");
            }
            Ok(_) => cur = candidate,
            Err(_) => {
                return Err(SystemError::Missing {
                    path: logical.to_string(),
                    physical: phys,
                });
            }
        }
    }
    Ok(physical_of(&cur))
}

/// Turn what the user typed for `--system` into the toplevel's store path: a logical
/// `/nix/store/...` path, its physical location under the root, or a link to either (`./result`).
pub fn toplevel_path(layout: &StoreLayout, arg: &str) -> Result<StorePath, SystemError> {
    let not_in_store = || SystemError::NotInStore {
        path: arg.to_string(),
        store: layout.logical_store_dir.clone(),
    };
    let mut s = arg.trim_end_matches('/').to_string();
    // A physical path under the chroot store: make it logical.
    let phys_store = layout.store_dir.display().to_string();
    if layout.root.is_some() {
        if let Some(rest) = s.strip_prefix(&phys_store) {
            s = format!("{}{rest}", layout.logical_store_dir);
        }
    }
    if !layout.is_in_store(&s) {
        // Maybe a link outside the store (like ./result) pointing into it.
        let target = std::fs::read_link(&s).map_err(|_| {
            if Path::new(&s).exists() {
                not_in_store()
            } else {
                SystemError::Missing {
                    path: arg.to_string(),
                    physical: PathBuf::from(&s),
                }
            }
        })?;
        s = target.display().to_string();
        if let Some(rest) = s.strip_prefix(&phys_store) {
            s = format!("{}{rest}", layout.logical_store_dir);
        }
        if !layout.is_in_store(&s) {
            return Err(not_in_store());
        }
    }
    let sp = StorePath::parse_prefix(&layout.logical_store_dir, &s).map_err(|_| not_in_store())?;
    if layout.logical(&sp) != s {
        // A path below a store path: follow it to whatever it names.
        let resolved = resolve_logical(layout, &s)?;
        let rel = resolved
            .strip_prefix(&layout.store_dir)
            .map_err(|_| not_in_store())?;
        let logical = format!("{}/{}", layout.logical_store_dir, rel.display());
        return StorePath::parse(&layout.logical_store_dir, &logical).map_err(|_| not_in_store());
    }
    Ok(sp)
}

/// Read the system at `toplevel`.
pub fn resolve_system(
    layout: &StoreLayout,
    toplevel: &StorePath,
) -> Result<SystemBoot, SystemError> {
    let top = layout.logical(toplevel);
    let phys = layout.physical(toplevel);
    if !phys.exists() {
        return Err(SystemError::Missing {
            path: top,
            physical: phys,
        });
    }
    let need = |what: &'static str| -> Result<PathBuf, SystemError> {
        resolve_logical(layout, &format!("{top}/{what}")).map_err(|e| match e {
            SystemError::Missing { .. } => SystemError::NotASystem {
                toplevel: top.clone(),
                what,
            },
            other => other,
        })
    };
    let kernel = need("kernel")?;
    let initrd = need("initrd")?;
    need("init")?;
    let params_file = need("kernel-params")?;
    let params = std::fs::read_to_string(&params_file).map_err(|source| SystemError::Io {
        path: params_file,
        source,
    })?;
    let params = params.split_whitespace().collect::<Vec<_>>().join(" ");
    let cmdline = format!("{params} init={top}/init").trim().to_string();
    Ok(SystemBoot {
        toplevel: toplevel.clone(),
        kernel,
        initrd,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const H1: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
    const H2: &str = "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b";

    /// A chroot store with a system whose kernel is a logical link into another store path.
    fn store() -> (tempfile::TempDir, StoreLayout, StorePath) {
        let d = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(d.path());
        let s = &layout.store_dir;
        let linux = s.join(format!("{H1}-linux"));
        std::fs::create_dir_all(&linux).unwrap();
        std::fs::write(linux.join("bzImage"), "kernel").unwrap();
        std::fs::write(linux.join("initrd"), "initrd").unwrap();
        let top = s.join(format!("{H2}-drydock-test-system"));
        std::fs::create_dir_all(&top).unwrap();
        symlink(format!("/nix/store/{H1}-linux/bzImage"), top.join("kernel")).unwrap();
        symlink(format!("../{H1}-linux/initrd"), top.join("initrd")).unwrap();
        std::fs::write(top.join("init"), "#!/bin/sh\n").unwrap();
        std::fs::write(top.join("kernel-params"), "quiet  loglevel=4\n").unwrap();
        let sp = StorePath::from_base_name(&format!("{H2}-drydock-test-system")).unwrap();
        (d, layout, sp)
    }

    #[test]
    fn resolves_logical_links_under_the_root() {
        let (_d, layout, top) = store();
        let b = resolve_system(&layout, &top).unwrap();
        assert_eq!(
            b.kernel,
            layout.store_dir.join(format!("{H1}-linux/bzImage"))
        );
        assert_eq!(
            b.initrd,
            layout.store_dir.join(format!("{H1}-linux/initrd"))
        );
        assert_eq!(
            b.cmdline,
            format!("quiet loglevel=4 init=/nix/store/{H2}-drydock-test-system/init")
        );
    }

    #[test]
    fn toplevel_forms() {
        let (d, layout, top) = store();
        let logical = format!("/nix/store/{H2}-drydock-test-system");
        assert_eq!(toplevel_path(&layout, &logical).unwrap(), top);
        assert_eq!(toplevel_path(&layout, &format!("{logical}/")).unwrap(), top);
        let physical = layout.store_dir.join(format!("{H2}-drydock-test-system"));
        assert_eq!(
            toplevel_path(&layout, &physical.display().to_string()).unwrap(),
            top
        );
        let result = d.path().join("result");
        symlink(&logical, &result).unwrap();
        assert_eq!(
            toplevel_path(&layout, &result.display().to_string()).unwrap(),
            top
        );
        assert!(matches!(
            toplevel_path(&layout, "/etc"),
            Err(SystemError::NotInStore { .. })
        ));
        assert!(matches!(
            toplevel_path(&layout, "/no/such/thing"),
            Err(SystemError::Missing { .. })
        ));
    }

    #[test]
    fn not_a_system_names_what_is_missing() {
        let (_d, layout, _) = store();
        let other = StorePath::from_base_name(&format!("{H1}-linux")).unwrap();
        let e = resolve_system(&layout, &other).unwrap_err();
        assert!(
            e.to_string()
                .contains("is not a NixOS-shaped system: it has no kernel"),
            "{e}"
        );
        assert!(e.is_bad_input());
        let gone = StorePath::from_base_name(&format!("{H1}-gone")).unwrap();
        assert!(matches!(
            resolve_system(&layout, &gone),
            Err(SystemError::Missing { .. })
        ));
    }

    #[test]
    fn link_loops_are_caught() {
        let (_d, layout, _) = store();
        let l = layout.store_dir.join(format!("{H1}-linux/loop"));
        symlink(format!("/nix/store/{H1}-linux/loop"), &l).unwrap();
        assert!(matches!(
            resolve_logical(&layout, &format!("/nix/store/{H1}-linux/loop")),
            Err(SystemError::Loop { .. })
        ));
    }
}
