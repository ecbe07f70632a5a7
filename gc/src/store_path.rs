//! Store paths and store layout: the `StorePath` type (hash part + name, validated as Nix does)
//! and `StoreLayout`, which maps between logical `/nix/store/...` names and the physical
//! directories of a chroot store (`--store ROOT`) or the system store.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::exitclass::{Classify, ExitClass};

/// Nix's base-32 alphabet (no `e`, `o`, `u`, `t`).
const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// Byte classes: bit 0 = in Nix's base-32 alphabet, bit 1 = allowed in a name.
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < NIX_BASE32.len() {
        t[NIX_BASE32[i] as usize] |= 1;
        i += 1;
    }
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=') {
            t[c] |= 2;
        }
        c += 1;
    }
    t
};
/// Length of the hash part of a store path name.
pub const HASH_LEN: usize = 32;
/// Longest name part Nix accepts.
const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorePathError {
    /// The path is not directly inside the store directory.
    #[error("'{path}' is not in the store directory '{store_dir}'")]
    NotInStore { path: String, store_dir: String },
    /// The base name is too short to hold a hash and a name.
    #[error("store path base name '{0}' is too short")]
    TooShort(String),
    /// The hash part has a character outside Nix's base-32 alphabet.
    #[error("store path base name '{0}' has an invalid hash part")]
    BadHash(String),
    /// The name part is empty, too long, starts with a dot or has a forbidden character.
    #[error("store path base name '{0}' has an invalid name part")]
    BadName(String),
}

impl Classify for StorePathError {
    /// Bad input: the string given is not a store path of the store.
    fn exit_class(&self) -> ExitClass {
        ExitClass::BadInput
    }
}

/// A store path's base name, `<hash>-<name>`, validated. The store directory is kept apart
/// (see [`StoreLayout`]), so two stores with the same logical directory share paths.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: Box<str>,
}

impl StorePath {
    /// Parse a base name `<32 base-32 chars>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        check_base_name(base)?;
        Ok(Self { base: base.into() })
    }

    /// Parse a full path `STORE_DIR/<hash>-<name>` (nothing after the base name).
    pub fn parse(store_dir: &str, path: &str) -> Result<Self, StorePathError> {
        parse_base_name(store_dir, path).map(|base| Self { base: base.into() })
    }

    /// Parse the store path that `path` is in or below (`STORE_DIR/<base>/sub/dir` works).
    pub fn parse_prefix(store_dir: &str, path: &str) -> Result<Self, StorePathError> {
        let rest = path
            .strip_prefix(store_dir)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: store_dir.to_owned(),
            })?;
        let base = rest.split('/').next().unwrap_or("");
        Self::from_base_name(base)
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    /// The name part (after the hash and dash).
    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    /// Whether this is a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.base.ends_with(".drv")
    }
}

/// Check that `base` is a valid base name `<32 base-32 chars>-<name>`, as Nix checks it.
pub(crate) fn check_base_name(base: &str) -> Result<(), StorePathError> {
    let bytes = base.as_bytes();
    if bytes.len() < HASH_LEN + 2 {
        return Err(StorePathError::TooShort(base.to_owned()));
    }
    if !bytes[..HASH_LEN]
        .iter()
        .all(|&b| CLASS[b as usize] & 1 != 0)
    {
        return Err(StorePathError::BadHash(base.to_owned()));
    }
    if bytes[HASH_LEN] != b'-' {
        return Err(StorePathError::BadHash(base.to_owned()));
    }
    let name = &bytes[HASH_LEN + 1..];
    let valid_char = |&c: &u8| CLASS[c as usize] & 2 != 0;
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name[0] == b'.'
        || !name.iter().all(valid_char)
    {
        return Err(StorePathError::BadName(base.to_owned()));
    }
    Ok(())
}

/// The validated base name of a full path `STORE_DIR/<hash>-<name>`, without allocating.
pub(crate) fn parse_base_name<'a>(
    store_dir: &str,
    path: &'a str,
) -> Result<&'a str, StorePathError> {
    let not_in_store = || StorePathError::NotInStore {
        path: path.to_owned(),
        store_dir: store_dir.to_owned(),
    };
    let rest = path
        .strip_prefix(store_dir)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(not_in_store)?;
    if rest.contains('/') {
        return Err(not_in_store());
    }
    check_base_name(rest)?;
    Ok(rest)
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// Where a store lives: its logical directory (names inside the database and in references)
/// and the physical directories on this machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreLayout {
    /// `--store ROOT` if any: every Nix command gets the same `--store`.
    pub root: Option<PathBuf>,
    /// Logical store directory, `/nix/store` unless `NIX_STORE_DIR` says otherwise.
    pub logical_store_dir: String,
    /// Physical directory that holds the store paths.
    pub store_dir: PathBuf,
    /// Physical Nix state directory (database, gcroots, profiles, temproots).
    pub state_dir: PathBuf,
}

impl StoreLayout {
    /// The layout of a chroot store at `root` (`ROOT/nix/store`, `ROOT/nix/var/nix`).
    pub fn chroot(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            store_dir: root.join("nix/store"),
            state_dir: root.join("nix/var/nix"),
            logical_store_dir: "/nix/store".to_owned(),
            root: Some(root),
        }
    }

    /// The system store, with explicit physical directories (from `NIX_STORE_DIR` /
    /// `NIX_STATE_DIR` or the defaults). The logical directory equals the physical one.
    pub fn system(store_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        let store_dir = store_dir.into();
        Self {
            logical_store_dir: store_dir.display().to_string(),
            store_dir,
            state_dir: state_dir.into(),
            root: None,
        }
    }

    /// Nix's database file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("db/db.sqlite")
    }

    /// The gcroots directory.
    pub fn gcroots_dir(&self) -> PathBuf {
        self.state_dir.join("gcroots")
    }

    /// Physical location of a store path.
    pub fn physical(&self, p: &StorePath) -> PathBuf {
        self.store_dir.join(p.base_name())
    }

    /// Logical full name of a store path, as Nix prints it.
    pub fn logical(&self, p: &StorePath) -> String {
        self.logical_of_base(p.base_name())
    }

    /// Logical full name of a store path given by its base name.
    pub fn logical_of_base(&self, base: &str) -> String {
        format!("{}/{}", self.logical_store_dir, base)
    }

    /// Parse a logical full path.
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        StorePath::parse(&self.logical_store_dir, path)
    }

    /// Whether `path` (a logical path, possibly below a store path) is inside the store.
    pub fn is_in_store(&self, path: &str) -> bool {
        path.strip_prefix(&self.logical_store_dir)
            .is_some_and(|r| r.starts_with('/') && r.len() > 1)
    }

    /// `--store ROOT` arguments for Nix commands (empty for the system store).
    pub fn nix_args(&self) -> Vec<String> {
        match &self.root {
            Some(root) => vec!["--store".into(), root.display().to_string()],
            None => Vec::new(),
        }
    }

    /// Whether this looks like a Nix store: the database file exists.
    pub fn has_database(&self) -> bool {
        Path::new(&self.db_path()).is_file()
    }

    /// The store's identity in drydock's runs database: the physical store directory as an
    /// absolute path, symlinks resolved as far as it exists (a chroot store's directory may
    /// only be made by its first build). The store directory, not the root, names a store: the
    /// system store has no root, and `--store /` is the system store at `/nix/store`.
    pub fn id(&self) -> String {
        resolve_existing(&self.store_dir).display().to_string()
    }
}

/// How to select the store whose [`StoreLayout::id`] is `id` on drydock's command line:
/// `--store ROOT` for `ROOT/nix/store`, no `--store` for `/nix/store`, else `NIX_STORE_DIR`.
pub fn store_option_hint(id: &str) -> String {
    match id.strip_suffix("/nix/store") {
        Some("") => "no --store (the system store)".to_owned(),
        Some(root) => format!("--store {root}"),
        None => format!("no --store, with NIX_STORE_DIR={id}"),
    }
}

/// `path` made absolute, with its longest existing prefix canonicalized.
fn resolve_existing(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut head = abs.as_path();
    let mut tail: Vec<&std::ffi::OsStr> = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(head) {
            return tail.iter().rev().fold(c, |acc, t| acc.join(t));
        }
        match (head.parent(), head.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name);
                head = parent;
            }
            _ => return abs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "2xcaqbzg07qabbc5kj1w1ic78jwsqh3b";

    #[test]
    fn parses_valid_paths() {
        let p = StorePath::parse("/nix/store", &format!("/nix/store/{H}-vm-test-run-x")).unwrap();
        assert_eq!(p.hash_part(), H);
        assert_eq!(p.name(), "vm-test-run-x");
        assert!(!p.is_derivation());
        let d = StorePath::from_base_name(&format!("{H}-foo.drv")).unwrap();
        assert!(d.is_derivation());
        let q = StorePath::parse_prefix("/nix/store", &format!("/nix/store/{H}-a/bin/sh")).unwrap();
        assert_eq!(q.name(), "a");
    }

    #[test]
    fn rejects_invalid_paths() {
        assert!(matches!(
            StorePath::parse("/nix/store", "/tmp/x"),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(StorePath::parse("/nix/store", &format!("/nix/store/{H}-a/b")).is_err());
        assert!(StorePath::parse("/nix/storex", &format!("/nix/store/{H}-a")).is_err());
        // 'e' is not in Nix's base-32 alphabet.
        let bad_hash = format!("e{}-a", &H[1..]);
        assert!(matches!(
            StorePath::from_base_name(&bad_hash),
            Err(StorePathError::BadHash(_))
        ));
        assert!(matches!(
            StorePath::from_base_name(&format!("{H}-.hidden")),
            Err(StorePathError::BadName(_))
        ));
        assert!(StorePath::from_base_name(&format!("{H}-a b")).is_err());
        assert!(StorePath::from_base_name(&format!("{H}-")).is_err());
        assert!(StorePath::from_base_name(&format!("{H}_abc")).is_err());
        assert!(StorePath::from_base_name(".links").is_err());
        assert!(StorePath::from_base_name(&format!("{H}-{}", "a".repeat(212))).is_err());
        assert!(StorePath::from_base_name(&format!("{H}-{}", "a".repeat(211))).is_ok());
    }

    #[test]
    fn layout_maps_logical_and_physical() {
        let l = StoreLayout::chroot("/tmp/r");
        let p = StorePath::from_base_name(&format!("{H}-x")).unwrap();
        assert_eq!(
            l.physical(&p),
            PathBuf::from(format!("/tmp/r/nix/store/{H}-x"))
        );
        assert_eq!(l.logical(&p), format!("/nix/store/{H}-x"));
        assert_eq!(
            l.db_path(),
            PathBuf::from("/tmp/r/nix/var/nix/db/db.sqlite")
        );
        assert!(l.is_in_store("/nix/store/abc"));
        assert!(!l.is_in_store("/nix/store"));
        assert!(!l.is_in_store("/nix/storex/abc"));
        assert_eq!(
            l.nix_args(),
            vec!["--store".to_owned(), "/tmp/r".to_owned()]
        );
    }

    #[test]
    fn store_id_is_the_resolved_store_dir() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("nix/store")).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let canon = std::fs::canonicalize(&real).unwrap();
        let want = canon.join("nix/store").display().to_string();
        assert_eq!(StoreLayout::chroot(&real).id(), want);
        // Through a symlink, the same store.
        assert_eq!(StoreLayout::chroot(dir.path().join("link")).id(), want);
        // A store whose directory does not exist yet: its existing prefix is resolved.
        let fresh = StoreLayout::chroot(dir.path().join("link/new")).id();
        assert_eq!(fresh, canon.join("new/nix/store").display().to_string());
        // The system store at /nix/store is the chroot store at /.
        let sys = StoreLayout::system("/nix/store", "/nix/var/nix");
        assert_eq!(
            resolve_existing(Path::new("/nix/store")),
            PathBuf::from(sys.id())
        );
        assert_eq!(sys.id(), StoreLayout::chroot("/").id());
        assert_eq!(store_option_hint("/tmp/a/nix/store"), "--store /tmp/a");
        assert_eq!(
            store_option_hint("/nix/store"),
            "no --store (the system store)"
        );
        assert_eq!(
            store_option_hint("/srv/store"),
            "no --store, with NIX_STORE_DIR=/srv/store"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,300}") {
            let _ = StorePath::from_base_name(&s);
            let _ = StorePath::parse("/nix/store", &s);
            let _ = StorePath::parse_prefix("/nix/store", &s);
        }
    }
}
