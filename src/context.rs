//! Resolution of the global options into concrete paths: where the Nix store and its database
//! live (`--store ROOT`, `NIX_STORE_DIR`, `NIX_STATE_DIR`) and where drydock keeps its state.

use std::path::PathBuf;

use drydock_gc::StoreLayout;

use crate::cli::GlobalOpts;
use crate::exit::bad_input;

/// Everything a subcommand needs to know about where things live and how to speak.
#[derive(Debug, Clone)]
pub struct Context {
    /// `--store ROOT`, validated to be an existing directory.
    pub store_root: Option<PathBuf>,
    /// The physical directory holding store paths (`ROOT/nix/store`, or `NIX_STORE_DIR`).
    pub store_dir: PathBuf,
    /// The physical Nix state directory (`ROOT/nix/var/nix`, or `NIX_STATE_DIR`).
    pub nix_state_dir: PathBuf,
    /// drydock's own state directory.
    pub state_dir: PathBuf,
    /// Print one JSON document on stdout instead of text.
    pub json: bool,
    /// `-f`/`-p` given before the subcommand.
    pub compose: crate::cli::ComposeOpts,
    /// How many `-v`.
    pub verbose: u8,
}

impl Context {
    /// Resolve and validate the global options. A `--store` that names nothing is bad input.
    pub fn resolve(opts: &GlobalOpts) -> anyhow::Result<Self> {
        let (store_root, store_dir, nix_state_dir) = match &opts.store {
            Some(root) => {
                let meta = std::fs::metadata(root)
                    .map_err(|e| bad_input(format!("--store {}: {e}", root.display())))?;
                if !meta.is_dir() {
                    return Err(bad_input(format!(
                        "--store {}: not a directory",
                        root.display()
                    )));
                }
                let root = std::path::absolute(root).unwrap_or_else(|_| root.clone());
                let store = root.join("nix/store");
                let state = root.join("nix/var/nix");
                (Some(root), store, state)
            }
            None => (
                None,
                env_path("NIX_STORE_DIR").unwrap_or_else(|| PathBuf::from("/nix/store")),
                env_path("NIX_STATE_DIR").unwrap_or_else(|| PathBuf::from("/nix/var/nix")),
            ),
        };
        let state_dir = match &opts.state_dir {
            Some(dir) => dir.clone(),
            None => default_state_dir_unless_set(),
        };
        let state_dir = check_state_dir(&state_dir)?;
        Ok(Self {
            store_root,
            store_dir,
            nix_state_dir,
            state_dir,
            json: opts.json,
            compose: Default::default(),
            verbose: opts.verbose,
        })
    }

    /// With `-f`/`-p` given before the subcommand: bad input unless it acts on a cluster.
    pub fn with_compose(
        mut self,
        opts: &crate::cli::ComposeOpts,
        cluster: bool,
    ) -> anyhow::Result<Self> {
        if !cluster && (!opts.file.is_empty() || opts.name.is_some()) {
            return Err(bad_input(
                "-f/--file and -p/--project-name name a cluster: give them with up, down, ps, exec, cp, logs, wait or shell",
            ));
        }
        self.compose = opts.clone();
        Ok(self)
    }

    /// The store's layout (logical and physical directories) for the store libraries.
    pub fn layout(&self) -> StoreLayout {
        match &self.store_root {
            Some(root) => StoreLayout::chroot(root),
            None => StoreLayout::system(&self.store_dir, &self.nix_state_dir),
        }
    }
}

/// The state directory as an absolute path, if it can be one: an existing path that is not a
/// directory, or a name longer than the file system allows, is bad input (it would fail later,
/// deep inside a command, with a less clear message).
fn check_state_dir(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let shown = dir.display();
    if dir.as_os_str().is_empty() {
        return Err(bad_input("--state-dir: empty path"));
    }
    let abs =
        std::path::absolute(dir).map_err(|e| bad_input(format!("--state-dir {shown}: {e}")))?;
    if let Some(long) = abs.components().find(|c| c.as_os_str().len() > 255) {
        return Err(bad_input(format!(
            "--state-dir {shown}: the name {:?}... is {} bytes; a file name has at most 255",
            String::from_utf8_lossy(&long.as_os_str().as_bytes()[..24]),
            long.as_os_str().len()
        )));
    }
    if abs.as_os_str().len() > 3000 {
        return Err(bad_input(format!(
            "--state-dir {shown}: the path is {} bytes, too long for the files drydock keeps in it",
            abs.as_os_str().len()
        )));
    }
    match std::fs::metadata(&abs) {
        Ok(m) if !m.is_dir() => Err(bad_input(format!("--state-dir {shown}: not a directory"))),
        Ok(_) => Ok(abs),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(abs),
        Err(e) => Err(bad_input(format!("--state-dir {shown}: {e}"))),
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$XDG_STATE_HOME/drydock`, else `~/.local/state/drydock`; `/var/lib/drydock` for root.
/// (`$DRYDOCK_STATE_DIR` is handled by clap as the option's environment variable.)
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = env_path("DRYDOCK_STATE_DIR") {
        return d;
    }
    default_state_dir_unless_set()
}

/// The default when neither `--state-dir` nor `$DRYDOCK_STATE_DIR` is given.
fn default_state_dir_unless_set() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/drydock");
    }
    if let Some(x) = env_path("XDG_STATE_HOME") {
        return x.join("drydock");
    }
    let home = env_path("HOME").unwrap_or_else(|| PathBuf::from("/"));
    home.join(".local/state/drydock")
}

fn is_root() -> bool {
    current_uid() == 0
}

pub use drydock_vm::current_uid;

impl Context {
    /// For `runs`, `du` and `gc` without `--store` (nor `NIX_STORE_DIR`): when the system store
    /// holds none of the runs recorded in the state directory and another store does, use the
    /// store of the most recent run, and say so on stderr.
    pub fn store_of_runs(self) -> Self {
        if self.store_root.is_some() || env_path("NIX_STORE_DIR").is_some() {
            return self;
        }
        if !self.state_dir.join("runs.sqlite").is_file() {
            return self;
        }
        let Ok(runs) = drydock_gc::RunsDb::open(&self.state_dir).and_then(|db| db.runs()) else {
            return self;
        };
        let recorded: Vec<(Option<String>, i64)> =
            runs.into_iter().map(|r| (r.store, r.started_at)).collect();
        let here = self.layout().id();
        let Some(root) = chosen_store(&recorded, &here, |d| std::path::Path::new(d).is_dir())
        else {
            return self;
        };
        eprintln!(
            "drydock: using --store {} (the system store has none of the runs recorded here; give --store to choose)",
            root.display()
        );
        Self {
            store_dir: root.join("nix/store"),
            nix_state_dir: root.join("nix/var/nix"),
            store_root: Some(root),
            ..self
        }
    }
}

/// Of runs recorded as (store, started), none in the store `here`: the chroot store root of
/// the most recent run in a store that still exists.
fn chosen_store(
    runs: &[(Option<String>, i64)],
    here: &str,
    exists: impl Fn(&str) -> bool,
) -> Option<PathBuf> {
    if runs.iter().any(|(s, _)| s.as_deref() == Some(here)) {
        return None;
    }
    runs.iter()
        .filter_map(|(s, t)| Some((s.as_deref()?, *t)))
        .filter(|(s, _)| exists(s))
        .filter_map(|(s, t)| {
            let root = s.strip_suffix("/nix/store").filter(|r| !r.is_empty())?;
            Some((t, root))
        })
        .max_by_key(|(t, _)| *t)
        .map(|(_, root)| PathBuf::from(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_elsewhere_choose_the_store_when_the_system_store_has_none() {
        let sys = "/nix/store";
        let r = |s: Option<&str>, t: i64| (s.map(str::to_string), t);
        let exists = |s: &str| s != "/gone/nix/store";
        for (runs, want) in [
            (vec![], None),
            (vec![r(Some(sys), 1), r(Some("/a/nix/store"), 2)], None),
            (vec![r(Some("/a/nix/store"), 2)], Some("/a")),
            (
                vec![
                    r(Some("/a/nix/store"), 2),
                    r(Some("/b/nix/store"), 5),
                    r(None, 9),
                ],
                Some("/b"),
            ),
            (
                vec![r(Some("/gone/nix/store"), 9), r(Some("/a/nix/store"), 1)],
                Some("/a"),
            ),
            (vec![r(Some("/gone/nix/store"), 9)], None),
            (vec![r(Some("/opt/store"), 3)], None),
        ] {
            assert_eq!(
                chosen_store(&runs, sys, exists),
                want.map(PathBuf::from),
                "{runs:?}"
            );
        }
    }
}
