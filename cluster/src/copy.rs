//! `cp`: files and directories between the host and a cluster machine, both ways, as a tar
//! archive through the backdoor (the guest's `tar`, base64 in the call's stdin one way and in
//! its reply the other), so bytes, modes and symbolic links arrive as they were. Where the copy
//! lands follows `docker cp`: into a directory that exists, else as the named path.
//!
//! What comes from a guest is not trusted: the archive is bounded ([`MAX_ARCHIVE`]), holds only
//! directories, regular files, symbolic links and hard links under one top entry, is unpacked
//! by the `tar` crate (which writes nothing outside the destination), and set-user-ID and
//! set-group-ID bits are dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drydock_gc::Cancel;
use serde::Serialize;

use crate::backdoor::sh_quote;
use crate::command::{GuestCommand, MAX_STDIN};
use crate::exec::exec_in;
use crate::state::ClusterError;
use drydock_vm::VmPaths;

/// The largest archive a copy moves, either way.
pub const MAX_ARCHIVE: usize = MAX_STDIN;

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{}: no such file or directory", .0.display())]
    NoSource(PathBuf),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is {} MiB as a tar archive; a copy moves at most {} MiB", bytes >> 20, MAX_ARCHIVE >> 20)]
    TooLarge { what: String, bytes: u64 },
    #[error("{}: no such directory", .0.display())]
    NoDirectory(PathBuf),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest's archive of {what} is refused: {why}")]
    BadArchive { what: String, why: String },
    /// The guest's side failed: its words.
    #[error("{vm}: {message}")]
    Guest {
        vm: String,
        message: String,
        bad_input: bool,
    },
    #[error(transparent)]
    Call(#[from] ClusterError),
}

impl CopyError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NoSource(_) | Self::TooLarge { .. } | Self::NoDirectory(_) => true,
            Self::Guest { bad_input, .. } => *bad_input,
            Self::Call(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub from: String,
    pub to: String,
    /// The size of the tar archive moved.
    pub bytes: u64,
}

/// The name a copy of `path` gets (its last component; `.` and `..` resolved first).
fn source_name(path: &Path) -> Result<String, CopyError> {
    let name = match path.file_name() {
        Some(n) => n.to_os_string(),
        None => std::path::absolute(path)
            .ok()
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.file_name().map(|n| n.to_os_string()))
            .ok_or_else(|| CopyError::NoSource(path.to_path_buf()))?,
    };
    name.into_string()
        .map_err(|n| CopyError::NoSource(PathBuf::from(n)))
}

/// The guest's text that unpacks the archive on its stdin as `dst` (see the module docs): into
/// `dst` if it is a directory (or ends with `/`, made if missing), else as `dst` itself, the
/// archive's top entry being `name`. Exit 2 when `dst`'s directory does not exist.
pub fn put_script(name: &str, dst: &str) -> String {
    format!(
        r#"n={n}; d={d}
case "$d" in */) mkdir -p "$d" || exit 1 ;; esac
if [ -d "$d" ]; then exec tar -x -o -f - -C "$d"; fi
p=$(dirname "$d")
[ -d "$p" ] || {{ echo "$p: no such directory" >&2; exit 2; }}
t=$(mktemp -d "$p/.drydock-cp.XXXXXX") || exit 1
tar -x -o -f - -C "$t" && mv -f "$t/$n" "$d"
s=$?; rm -rf "$t"; exit $s"#,
        n = sh_quote(name),
        d = sh_quote(dst)
    )
}

/// The guest's text that prints `src` as a tar archive whose top entry is its last component,
/// refused (exit 3) beyond `max` bytes; exit 2 when `src` does not exist.
pub fn get_script(src: &str, max: usize) -> String {
    format!(
        r#"s={s}
[ -e "$s" ] || [ -L "$s" ] || {{ echo "$s: no such file or directory" >&2; exit 2; }}
t=$(mktemp) || exit 1
tar -c -f "$t" -C "$(dirname "$s")" "$(basename "$s")" || {{ rm -f "$t"; exit 1; }}
z=$(wc -c <"$t")
[ "$z" -le {max} ] || {{ rm -f "$t"; echo "drydock-too-large $z" >&2; exit 3; }}
cat "$t"; rm -f "$t""#,
        s = sh_quote(src)
    )
}

/// The archive of `src` (a file, link or directory), its top entry named `name`.
fn pack(src: &Path, name: &str) -> Result<Vec<u8>, CopyError> {
    let read = |source| CopyError::Read {
        path: src.to_path_buf(),
        source,
    };
    let meta = std::fs::symlink_metadata(src).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CopyError::NoSource(src.to_path_buf()),
        _ => read(e),
    })?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    if meta.is_dir() {
        b.append_dir_all(name, src).map_err(read)?;
    } else {
        b.append_path_with_name(src, name).map_err(read)?;
    }
    b.into_inner().map_err(read)
}

/// Copy the host's `src` to `dst` in the VM `vm`; `cancel` ends it (the guest's side killed).
pub fn copy_to_guest(
    vm: &str,
    paths: &VmPaths,
    src: &Path,
    dst: &str,
    timeout: Duration,
    cancel: Option<&Cancel>,
) -> Result<CopyReport, CopyError> {
    let name = source_name(src)?;
    let archive = pack(src, &name)?;
    if archive.len() > MAX_ARCHIVE {
        return Err(CopyError::TooLarge {
            what: src.display().to_string(),
            bytes: archive.len() as u64,
        });
    }
    let cmd = GuestCommand::Line(put_script(&name, dst));
    let o = exec_in(vm, paths, &cmd, &archive, timeout, cancel)?;
    if o.status != 0 {
        return Err(guest_failed(vm, o.status, &o.stderr));
    }
    Ok(CopyReport {
        from: src.display().to_string(),
        to: format!("{vm}:{dst}"),
        bytes: archive.len() as u64,
    })
}

/// The guest's failure, in its words (bounded, control characters replaced).
fn guest_failed(vm: &str, status: i32, stderr: &[u8]) -> CopyError {
    let text: String = String::from_utf8_lossy(&stderr[..stderr.len().min(2000)])
        .trim()
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect();
    CopyError::Guest {
        vm: vm.to_string(),
        message: match (status, text.is_empty()) {
            (124, _) => "the copy did not finish in time (--timeout)".to_string(),
            (_, true) => format!("the copy failed with status {status}"),
            (_, false) => text,
        },
        bad_input: status == 2,
    }
}

/// The top entry of a guest's archive, if every entry is under it and of a kind a copy brings.
pub fn check_archive(bytes: &[u8]) -> Result<String, String> {
    use std::path::Component;
    let mut top: Option<String> = None;
    let mut a = tar::Archive::new(bytes);
    for e in a.entries().map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let kind = e.header().entry_type();
        let path = e.path().map_err(|e| e.to_string())?.into_owned();
        let shown = path.display().to_string();
        // (GNU long names and pax headers are read into the entries they describe.)
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link()) {
            return Err(format!("{shown} is a {kind:?} entry"));
        }
        let mut parts = path.components();
        let first = match parts.next() {
            Some(Component::Normal(n)) => n.to_string_lossy().into_owned(),
            _ => return Err(format!("the entry {shown:?} is not a relative path")),
        };
        if parts.any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("the entry {shown:?} leaves its directory"));
        }
        match &top {
            None => top = Some(first),
            Some(t) if *t == first => {}
            Some(t) => return Err(format!("entries under both {t:?} and {first:?}")),
        }
    }
    top.ok_or_else(|| "the archive is empty".to_string())
}

/// Copy `src` in the VM `vm` to the host's `dst`; `cancel` ends it (the guest's side killed).
pub fn copy_from_guest(
    vm: &str,
    paths: &VmPaths,
    src: &str,
    dst: &Path,
    timeout: Duration,
    cancel: Option<&Cancel>,
) -> Result<CopyReport, CopyError> {
    let cmd = GuestCommand::Line(get_script(src, MAX_ARCHIVE));
    let o = exec_in(vm, paths, &cmd, &[], timeout, cancel)?;
    let what = format!("{vm}:{src}");
    if o.status == 3
        && let Some(z) = String::from_utf8_lossy(&o.stderr)
            .trim()
            .strip_prefix("drydock-too-large ")
            .and_then(|z| z.parse().ok())
    {
        return Err(CopyError::TooLarge { what, bytes: z });
    }
    if o.status != 0 {
        return Err(guest_failed(vm, o.status, &o.stderr));
    }
    let bytes = o.stdout;
    let top = check_archive(&bytes).map_err(|why| CopyError::BadArchive {
        what: what.clone(),
        why,
    })?;
    let write = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CopyError::Write { path, source }
    };
    let into_dir = dst.is_dir();
    let parent = match dst.parent() {
        _ if into_dir => dst.to_path_buf(),
        Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
        Some(p) => p.to_path_buf(),
        None => PathBuf::from("/"),
    };
    if !parent.is_dir() {
        return Err(CopyError::NoDirectory(parent));
    }
    // Unpacked beside the destination, then moved there whole (or merged into a directory).
    let tmp = parent.join(format!(".drydock-cp.{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(write(&tmp))?;
    let result = (|| {
        let mut a = tar::Archive::new(bytes.as_slice());
        a.set_preserve_permissions(true);
        a.set_overwrite(true);
        a.unpack(&tmp).map_err(write(&tmp))?;
        drop_set_id_bits(&tmp.join(&top)).map_err(write(&tmp))?;
        let target = if into_dir {
            dst.join(&top)
        } else {
            dst.to_path_buf()
        };
        if into_dir && target.is_dir() && tmp.join(&top).is_dir() {
            merge(&tmp.join(&top), &target).map_err(write(&target))
        } else {
            std::fs::rename(tmp.join(&top), &target).map_err(write(&target))
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(CopyReport {
        from: what,
        to: dst.display().to_string(),
        bytes: bytes.len() as u64,
    })
}

/// Clear the set-user-ID and set-group-ID bits under `path` (links are not followed).
fn drop_set_id_bits(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o6000 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o6000))?;
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            drop_set_id_bits(&e?.path())?;
        }
    }
    Ok(())
}

/// Move the tree `from` into the existing directory `to`, replacing what has the same name.
fn merge(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        let is_dir = e.file_type()?.is_dir();
        if is_dir && target.is_dir() && !target.is_symlink() {
            merge(&e.path(), &target)?;
        } else {
            if target.is_dir() && !target.is_symlink() {
                std::fs::remove_dir_all(&target)?;
            }
            std::fs::rename(e.path(), &target)?;
        }
    }
    // The directory's own mode, as the archive had it.
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, tar::EntryType)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_cksum();
            // set_path refuses `..`; write the raw name as a guest could.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn a_guest_archive_is_one_tree_of_plain_entries() {
        use tar::EntryType::*;
        for (entries, want) in [
            (vec![("log", Directory), ("log/a", Regular)], Ok("log")),
            (vec![("f", Regular)], Ok("f")),
            (vec![("d", Directory), ("d/l", Symlink)], Ok("d")),
            (vec![("a", Regular), ("b", Regular)], Err("both")),
            (vec![("d/../x", Regular)], Err("leaves")),
            (vec![("/etc/x", Regular)], Err("not a relative path")),
            (vec![("d", Directory), ("d/null", Char)], Err("Char")),
            (vec![("d/fifo", Fifo)], Err("Fifo")),
            (vec![], Err("empty")),
        ] {
            let got = check_archive(&archive(&entries));
            match want {
                Ok(top) => assert_eq!(got, Ok(top.to_string()), "{entries:?}"),
                Err(part) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(part)),
                    "{entries:?}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn the_guest_scripts_quote_their_paths() {
        let p = put_script("it's", "/tmp/a b/");
        assert!(p.starts_with(r"n='it'\''s'; d='/tmp/a b/'"), "{p}");
        let g = get_script("/var/log/x y", 100);
        assert!(g.starts_with("s='/var/log/x y'\n"), "{g}");
        assert!(g.contains("-le 100 ]"), "{g}");
    }

    #[test]
    fn a_source_is_named_by_its_last_component() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(source_name(&sub).unwrap(), "sub");
        assert_eq!(source_name(&sub.join(".")).unwrap(), "sub");
        assert_eq!(source_name(Path::new("a/b.txt")).unwrap(), "b.txt");
    }

    #[test]
    fn a_packed_tree_keeps_modes_and_unpacks_without_set_id_bits() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("tree");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/run"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("sub/run"), std::fs::Permissions::from_mode(0o4751))
            .unwrap();
        std::os::unix::fs::symlink("sub/run", src.join("link")).unwrap();
        let bytes = pack(&src, "tree").unwrap();
        assert_eq!(check_archive(&bytes), Ok("tree".to_string()));
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        tar::Archive::new(bytes.as_slice()).unpack(&out).unwrap();
        drop_set_id_bits(&out.join("tree")).unwrap();
        let mode = std::fs::metadata(out.join("tree/sub/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o751);
        assert_eq!(
            std::fs::read_link(out.join("tree/link")).unwrap(),
            Path::new("sub/run")
        );
    }
}
