//! Nix's configuration, read the way Nix 2.8 reads it, for everything in drydock that must agree
//! with Nix: the collector's `keep-outputs` / `keep-derivations` ([`crate::GcSettings`]) and the
//! doctor's `system-features`, `sandbox`, `build-users-group`, ...
//!
//! Sources, in order (later settings win): `$NIX_CONF_DIR/nix.conf` (default `/etc/nix`), the
//! user's files (`$NIX_USER_CONF_FILES`, else `$XDG_CONFIG_HOME/nix/nix.conf` or
//! `~/.config/nix/nix.conf` and `nix/nix.conf` under each of `$XDG_CONFIG_DIRS`, default
//! `/etc/xdg`; Nix applies them last to first, so the first listed wins), then `$NIX_CONFIG`.
//! `builders` defaults to `@$NIX_CONF_DIR/machines`, as in Nix ([`NixConf::builders`]).
//! Lines are `name = value` (`#` starts a comment); `include FILE` and `!include FILE` read
//! `FILE` relative to the including file's directory (`include` of a missing file is an error,
//! as in Nix; `!include` skips it); `extra-NAME = ...` appends to `NAME`.
//!
//! Files are read under a root directory that every absolute path is joined under: `/` for the
//! real system, a fixture tree in the doctor's tests. A file that is missing or hidden behind a
//! directory we may not search is absent. A file that exists but cannot be read is an error:
//! Nix 2.8 silently skips such a file, but the nix-daemon (root) may well read it, so drydock
//! cannot know which settings Nix collects with and says so instead of guessing.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::exitclass::{Classify, ExitClass};

/// Includes nested deeper than this are ignored (Nix has no limit and recurses forever).
const MAX_INCLUDE_DEPTH: u32 = 8;

/// Why Nix's configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NixConfError {
    /// A configuration file exists but cannot be read.
    #[error("cannot read Nix configuration {}", path.display())]
    Unreadable {
        /// The physical path of the file.
        path: PathBuf,
        #[source]
        source: crate::fsread::ReadFileError,
    },
    /// `include FILE` names a file that does not exist (Nix refuses to run).
    #[error("Nix configuration {from}: included file {} not found", path.display())]
    MissingInclude {
        /// The physical path of the missing file.
        path: PathBuf,
        /// The file (or `NIX_CONFIG`) with the `include` line.
        from: String,
    },
    /// A boolean setting with a value Nix rejects (Nix refuses to run).
    #[error(
        "Nix configuration {origin}: `{name} = {value}`: not a boolean (true/false, yes/no, 1/0)"
    )]
    InvalidBool {
        /// The setting's name as written.
        name: String,
        /// The value as written.
        value: String,
        /// Where it was set.
        origin: String,
    },
}

impl NixConfError {
    /// `self.exit_class() == ExitClass::BadInput`, for drydock-vm's own `is_bad_input`s until
    /// they ask [`Classify`]; remove then.
    pub fn is_bad_input(&self) -> bool {
        self.exit_class() == ExitClass::BadInput
    }
}

impl Classify for NixConfError {
    /// Bad input: every way a configuration can be bad is the user's (Nix refuses it too).
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::Unreadable { .. } | Self::MissingInclude { .. } | Self::InvalidBool { .. } => {
                ExitClass::BadInput
            }
        }
    }
}

/// Where Nix reads its configuration from, in order (later settings win).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixConfSources {
    /// Configuration files, lowest priority first (missing ones are skipped, unreadable ones
    /// are an error).
    pub files: Vec<PathBuf>,
    /// The contents of `NIX_CONFIG`.
    pub inline: Option<String>,
    /// Nix's configuration directory (`$NIX_CONF_DIR`, default `/etc/nix`), which holds the
    /// default machines file.
    pub conf_dir: PathBuf,
}

impl NixConfSources {
    /// As Nix finds them from this process's environment (see the module documentation).
    /// Relative paths are taken relative to the current directory, as Nix does.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// As Nix finds them, with environment variables from `var`.
    fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let conf_dir = var("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/etc/nix".into());
        let mut user: Vec<PathBuf> = Vec::new();
        if let Some(list) = var("NIX_USER_CONF_FILES") {
            user.extend(std::env::split_paths(&list).filter(|p| !p.as_os_str().is_empty()));
        } else {
            let home = var("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")));
            user.extend(home.map(|h| h.join("nix/nix.conf")));
            let dirs = var("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".into());
            user.extend(
                std::env::split_paths(&dirs)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|d| d.join("nix/nix.conf")),
            );
        }
        // Nix applies the user's files last to first: the first one listed wins.
        let files = std::iter::once(conf_dir.join("nix.conf"))
            .chain(user.into_iter().rev())
            .map(abs)
            .collect();
        Self {
            files,
            inline: var("NIX_CONFIG").map(|v| v.to_string_lossy().into_owned()),
            conf_dir: abs(conf_dir),
        }
    }
}

/// A setting's merged value and where it was set (`A + B` when `extra-` appended to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The value, words separated by single spaces.
    pub value: String,
    /// The file (as named in the configuration) or `NIX_CONFIG` that set it.
    pub source: String,
}

/// One `name = value` line, in the order Nix applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Assignment {
    /// The name without `extra-`.
    name: String,
    value: String,
    origin: String,
    /// Written as `extra-NAME`.
    append: bool,
}

/// The merged configuration.
#[derive(Debug, Clone, Default)]
pub struct NixConf {
    assignments: Vec<Assignment>,
    settings: BTreeMap<String, Setting>,
}

impl NixConf {
    /// Read every source, with absolute paths joined under `root` (`/` for the real system).
    pub fn load(root: &Path, sources: &NixConfSources) -> Result<Self, NixConfError> {
        let mut conf = Self::default();
        for f in &sources.files {
            conf.load_file(root, f, false, "", 0)?;
        }
        if let Some(text) = &sources.inline {
            conf.parse(root, text, "NIX_CONFIG", None, 0)?;
        }
        Ok(conf)
    }

    /// The merged value of a setting (`extra-` lines appended), if any source sets it.
    pub fn get(&self, name: &str) -> Option<&Setting> {
        self.settings.get(name)
    }

    /// The `builders` setting, or Nix's default `@CONF_DIR/machines` (source `Nix's default`).
    pub fn builders(&self, sources: &NixConfSources) -> Setting {
        self.get("builders").cloned().unwrap_or_else(|| Setting {
            value: format!("@{}", sources.conf_dir.join("machines").display()),
            source: "Nix's default".to_owned(),
        })
    }

    /// Whether no source sets anything.
    pub fn is_empty(&self) -> bool {
        self.assignments.is_empty()
    }

    /// A boolean setting known under any of `names` (a name and its aliases, e.g.
    /// `keep-outputs` and `gc-keep-outputs`): the last assignment wins. As in Nix, `extra-`
    /// does not apply to booleans, and any invalid value is an error.
    pub fn get_bool(&self, names: &[&str]) -> Result<Option<bool>, NixConfError> {
        let mut out = None;
        for a in &self.assignments {
            if a.append || !names.contains(&a.name.as_str()) {
                continue;
            }
            out = Some(match a.value.as_str() {
                "true" | "yes" | "1" => true,
                "false" | "no" | "0" => false,
                _ => {
                    return Err(NixConfError::InvalidBool {
                        name: a.name.clone(),
                        value: a.value.clone(),
                        origin: a.origin.clone(),
                    });
                }
            });
        }
        Ok(out)
    }

    /// Read `path` (a path of the configured system) if it exists. `required`: an `include`d
    /// file, which must exist.
    fn load_file(
        &mut self,
        root: &Path,
        path: &Path,
        required: bool,
        from: &str,
        depth: u32,
    ) -> Result<(), NixConfError> {
        let physical = under_root(root, path);
        // A file we cannot even see (missing, or behind a directory we may not search, like
        // another user's home) is absent, as for Nix; one that exists but cannot be read is an
        // error.
        match std::fs::metadata(&physical) {
            Ok(_) => {}
            Err(e)
                if required
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
            {
                return Err(NixConfError::MissingInclude {
                    path: physical,
                    from: from.to_owned(),
                });
            }
            Err(e) => {
                tracing::debug!("Nix configuration {} absent: {e}", physical.display());
                return Ok(());
            }
        }
        let text = crate::fsread::read_regular_text(
            &physical,
            crate::fsread::Links::Follow,
            crate::fsread::MAX_CONF_BYTES,
        )
        .map_err(|source| NixConfError::Unreadable {
            path: physical.clone(),
            source,
        })?;
        self.parse(
            root,
            &text,
            &path.display().to_string(),
            path.parent(),
            depth,
        )
    }

    /// Apply the lines of `text`, read from `origin`; includes are relative to `dir` (the
    /// current directory for `NIX_CONFIG`, as in Nix).
    fn parse(
        &mut self,
        root: &Path,
        text: &str,
        origin: &str,
        dir: Option<&Path>,
        depth: u32,
    ) -> Result<(), NixConfError> {
        // Warnings name the file and the line number, never the line: an `include` can point
        // at any file (`include /etc/shadow`), and its lines must not reach the terminal.
        for (i, raw) in text.lines().enumerate() {
            let at = i + 1;
            let line = raw.split('#').next().unwrap_or("");
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                [kw @ ("include" | "!include"), file] => {
                    if depth >= MAX_INCLUDE_DEPTH {
                        tracing::warn!(
                            "{origin}, line {at}: an include nested more than {MAX_INCLUDE_DEPTH} deep, ignored"
                        );
                        continue;
                    }
                    let file = match dir {
                        Some(d) => d.join(file),
                        None => std::path::absolute(file).unwrap_or_else(|_| file.into()),
                    };
                    self.load_file(root, &file, *kw == "include", origin, depth + 1)?;
                }
                [name, "=", value @ ..] => self.set(name, value.join(" "), origin),
                _ => tracing::warn!("{origin}, line {at}: not `name = value`; Nix rejects it"),
            }
        }
        Ok(())
    }

    fn set(&mut self, name: &str, value: String, origin: &str) {
        let (name, append) = match name.strip_prefix("extra-") {
            Some(base) => (base, true),
            None => (name, false),
        };
        match self.settings.get_mut(name) {
            Some(s) if append => {
                s.value = format!("{} {value}", s.value).trim().to_owned();
                s.source = format!("{} + {origin}", s.source);
            }
            _ => {
                self.settings.insert(
                    name.to_owned(),
                    Setting {
                        value: value.clone(),
                        source: origin.to_owned(),
                    },
                );
            }
        }
        self.assignments.push(Assignment {
            name: name.to_owned(),
            value,
            origin: origin.to_owned(),
            append,
        });
    }
}

/// The physical path of a path of the configured system: absolute paths are joined under
/// `root` (`/` leaves them as they are).
fn under_root(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// A fixture root holding `files` (paths relative to the root).
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in files {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        d
    }

    fn sources(files: &[&str], inline: Option<&str>) -> NixConfSources {
        NixConfSources {
            files: files.iter().map(PathBuf::from).collect(),
            inline: inline.map(str::to_owned),
            conf_dir: "/etc/nix".into(),
        }
    }

    const SYS: &str = "/etc/nix/nix.conf";
    const USER: &str = "/home/u/.config/nix/nix.conf";

    #[test]
    fn merged_settings() {
        struct Case {
            what: &'static str,
            files: &'static [(&'static str, &'static str)],
            inline: Option<&'static str>,
            name: &'static str,
            /// Expected (value, source).
            want: Option<(&'static str, &'static str)>,
        }
        let cases = [
            Case {
                what: "comments, spacing",
                files: &[(SYS, "# c\nsandbox   =  relaxed   # trailing\n")],
                inline: None,
                name: "sandbox",
                want: Some(("relaxed", SYS)),
            },
            Case {
                what: "words joined by one space",
                files: &[(SYS, "system-features = kvm \t nixos-test\n")],
                inline: None,
                name: "system-features",
                want: Some(("kvm nixos-test", SYS)),
            },
            Case {
                what: "later line wins",
                files: &[(SYS, "sandbox = true\nsandbox = false\n")],
                inline: None,
                name: "sandbox",
                want: Some(("false", SYS)),
            },
            Case {
                what: "include, relative to the including file",
                files: &[
                    (SYS, "include extra.conf\n"),
                    ("/etc/nix/extra.conf", "sandbox = relaxed\n"),
                ],
                inline: None,
                name: "sandbox",
                want: Some(("relaxed", "/etc/nix/extra.conf")),
            },
            Case {
                what: "include, absolute, nested",
                files: &[
                    (SYS, "include /opt/a.conf\n"),
                    ("/opt/a.conf", "!include sub/b.conf\n"),
                    ("/opt/sub/b.conf", "sandbox = relaxed\n"),
                ],
                inline: None,
                name: "sandbox",
                want: Some(("relaxed", "/opt/sub/b.conf")),
            },
            Case {
                what: "the line after an include wins over it",
                files: &[
                    (SYS, "include extra.conf\nsandbox = true\n"),
                    ("/etc/nix/extra.conf", "sandbox = relaxed\n"),
                ],
                inline: None,
                name: "sandbox",
                want: Some(("true", SYS)),
            },
            Case {
                what: "!include of a missing file is skipped",
                files: &[(SYS, "!include missing.conf\nsandbox = false\n")],
                inline: None,
                name: "sandbox",
                want: Some(("false", SYS)),
            },
            Case {
                what: "extra- appends, across files and NIX_CONFIG",
                files: &[
                    (SYS, "system-features = kvm\n"),
                    (USER, "extra-system-features = nixos-test\n"),
                ],
                inline: Some("extra-system-features = big-parallel"),
                name: "system-features",
                want: Some((
                    "kvm nixos-test big-parallel",
                    "/etc/nix/nix.conf + /home/u/.config/nix/nix.conf + NIX_CONFIG",
                )),
            },
            Case {
                what: "extra- alone",
                files: &[(SYS, "extra-system-features = kvm\n")],
                inline: None,
                name: "system-features",
                want: Some(("kvm", SYS)),
            },
            Case {
                what: "the user's file wins over the system's",
                files: &[(SYS, "sandbox = true\n"), (USER, "sandbox = false\n")],
                inline: None,
                name: "sandbox",
                want: Some(("false", USER)),
            },
            Case {
                what: "NIX_CONFIG wins over every file",
                files: &[(SYS, "sandbox = true\n"), (USER, "sandbox = false\n")],
                inline: Some("sandbox = relaxed"),
                name: "sandbox",
                want: Some(("relaxed", "NIX_CONFIG")),
            },
            Case {
                what: "a plain setting after extra- replaces",
                files: &[(SYS, "extra-system-features = a\nsystem-features = b\n")],
                inline: None,
                name: "system-features",
                want: Some(("b", SYS)),
            },
            Case {
                what: "malformed lines are not settings",
                files: &[(SYS, "bogus line\nsandbox=false\nsandbox\n")],
                inline: None,
                name: "sandbox",
                want: None,
            },
            Case {
                what: "missing files are absent",
                files: &[],
                inline: None,
                name: "sandbox",
                want: None,
            },
        ];
        for c in cases {
            let rel: Vec<(&str, &str)> = c
                .files
                .iter()
                .map(|(p, t)| (p.trim_start_matches('/'), *t))
                .collect();
            let d = tree(&rel);
            let conf = NixConf::load(d.path(), &sources(&[SYS, USER], c.inline))
                .unwrap_or_else(|e| panic!("{}: {e}", c.what));
            let got = conf
                .get(c.name)
                .map(|s| (s.value.as_str(), s.source.as_str()));
            assert_eq!(got, c.want, "{}", c.what);
        }
    }

    #[test]
    fn booleans_with_aliases() {
        /// (what, files, NIX_CONFIG, expected)
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
            Option<bool>,
        );
        let names = ["keep-outputs", "gc-keep-outputs"];
        let cases: &[Case] = &[
            ("unset", &[], None, None),
            ("plain", &[(SYS, "keep-outputs = true\n")], None, Some(true)),
            (
                "yes/no/1/0",
                &[(SYS, "keep-outputs = yes\n")],
                None,
                Some(true),
            ),
            ("0", &[(SYS, "keep-outputs = 0\n")], None, Some(false)),
            (
                "the alias, later, wins",
                &[(SYS, "keep-outputs = false\ngc-keep-outputs = true\n")],
                None,
                Some(true),
            ),
            (
                "the name, later, wins over the alias",
                &[(SYS, "gc-keep-outputs = true\nkeep-outputs = false\n")],
                None,
                Some(false),
            ),
            (
                "via NIX_CONFIG over the file",
                &[(SYS, "keep-outputs = false\n")],
                Some("keep-outputs = true"),
                Some(true),
            ),
            (
                "via an included file",
                &[
                    (SYS, "include gc.conf\n"),
                    ("/etc/nix/gc.conf", "keep-outputs = true\n"),
                ],
                None,
                Some(true),
            ),
            (
                "via the user's file",
                &[(USER, "keep-outputs = true\n")],
                None,
                Some(true),
            ),
            (
                "extra- does not apply to booleans (Nix warns and ignores it)",
                &[(SYS, "keep-outputs = false\nextra-keep-outputs = true\n")],
                None,
                Some(false),
            ),
        ];
        for (what, files, inline, want) in cases {
            let rel: Vec<(&str, &str)> = files
                .iter()
                .map(|(p, t)| (p.trim_start_matches('/'), *t))
                .collect();
            let d = tree(&rel);
            let conf = NixConf::load(d.path(), &sources(&[SYS, USER], *inline)).unwrap();
            assert_eq!(conf.get_bool(&names).unwrap(), *want, "{what}");
        }
    }

    #[test]
    fn invalid_boolean_is_bad_input() {
        let d = tree(&[(
            "etc/nix/nix.conf",
            "keep-outputs = maybe\nkeep-outputs = true\n",
        )]);
        let conf = NixConf::load(d.path(), &sources(&[SYS], None)).unwrap();
        let err = conf.get_bool(&["keep-outputs"]).unwrap_err();
        assert_eq!(err.exit_class(), ExitClass::BadInput);
        assert!(
            err.to_string().contains(SYS) && err.to_string().contains("maybe"),
            "{err}"
        );
    }

    #[test]
    fn unreadable_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        // A directory where the file should be: it exists and cannot be read as a file.
        std::fs::create_dir_all(d.path().join("etc/nix/nix.conf")).unwrap();
        let err = NixConf::load(d.path(), &sources(&[SYS], None)).unwrap_err();
        assert!(matches!(err, NixConfError::Unreadable { .. }), "{err:?}");
        assert_eq!(err.exit_class(), ExitClass::BadInput);
        let physical = d.path().join("etc/nix/nix.conf");
        assert!(
            err.to_string().contains(&physical.display().to_string()),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
        // The same through an include.
        let d = tree(&[("etc/nix/nix.conf", "!include inc.conf\n")]);
        std::fs::create_dir(d.path().join("etc/nix/inc.conf")).unwrap();
        let err = NixConf::load(d.path(), &sources(&[SYS], None)).unwrap_err();
        assert!(err.to_string().contains("inc.conf"), "{err}");
    }

    #[test]
    fn include_of_a_missing_file_is_an_error() {
        let d = tree(&[("etc/nix/nix.conf", "include missing.conf\n")]);
        let err = NixConf::load(d.path(), &sources(&[SYS], None)).unwrap_err();
        assert!(
            matches!(err, NixConfError::MissingInclude { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("missing.conf") && err.to_string().contains(SYS),
            "{err}"
        );
    }

    #[test]
    fn builders_default_to_the_machines_file_in_the_conf_dir() {
        let d = tree(&[]);
        let mut src = sources(&[SYS], None);
        src.conf_dir = "/c".into();
        let conf = NixConf::load(d.path(), &src).unwrap();
        let b = conf.builders(&src);
        assert_eq!(
            (b.value.as_str(), b.source.as_str()),
            ("@/c/machines", "Nix's default")
        );
        let d = tree(&[("etc/nix/nix.conf", "builders = ssh://a ; ssh://b # c\n")]);
        let conf = NixConf::load(d.path(), &src).unwrap();
        let b = conf.builders(&src);
        assert_eq!(
            (b.value.as_str(), b.source.as_str()),
            ("ssh://a ; ssh://b", SYS)
        );
        let conf = NixConf::load(d.path(), &sources(&[SYS], Some("builders = @/m"))).unwrap();
        assert_eq!(conf.builders(&src).value, "@/m");
    }

    #[test]
    fn include_loops_stop() {
        let d = tree(&[("etc/nix/nix.conf", "sandbox = false\ninclude nix.conf\n")]);
        let conf = NixConf::load(d.path(), &sources(&[SYS], None)).unwrap();
        assert_eq!(conf.get("sandbox").unwrap().value, "false");
    }

    #[test]
    fn sources_from_the_environment() {
        let env = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, OsString)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            NixConfSources::from_vars(move |k| {
                vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
            })
        };
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        let s = env(&[("HOME", "/home/u")]);
        assert_eq!(
            s.files,
            p(&[
                "/etc/nix/nix.conf",
                "/etc/xdg/nix/nix.conf",
                "/home/u/.config/nix/nix.conf"
            ])
        );
        assert_eq!(s.inline, None);
        let s = env(&[
            ("NIX_CONF_DIR", "/c"),
            ("XDG_CONFIG_HOME", "/x"),
            ("XDG_CONFIG_DIRS", "/d1:/d2"),
            ("HOME", "/home/u"),
            ("NIX_CONFIG", "sandbox = false"),
        ]);
        assert_eq!(
            s.files,
            p(&[
                "/c/nix.conf",
                "/d2/nix/nix.conf",
                "/d1/nix/nix.conf",
                "/x/nix/nix.conf"
            ])
        );
        assert_eq!(s.inline.as_deref(), Some("sandbox = false"));
        assert_eq!(s.conf_dir, PathBuf::from("/c"));
        // NIX_USER_CONF_FILES replaces the XDG files; the first listed wins, so comes last.
        let s = env(&[("NIX_USER_CONF_FILES", "/a.conf:/b.conf"), ("HOME", "/h")]);
        assert_eq!(s.files, p(&["/etc/nix/nix.conf", "/b.conf", "/a.conf"]));
        // Empty variables count as unset.
        let s = env(&[("NIX_CONF_DIR", ""), ("NIX_CONFIG", "")]);
        assert_eq!(s.files, p(&["/etc/nix/nix.conf", "/etc/xdg/nix/nix.conf"]));
        assert_eq!(s.inline, None);
        // Relative paths are relative to the current directory.
        let s = env(&[("NIX_CONF_DIR", "rel"), ("NIX_USER_CONF_FILES", "u.conf")]);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(s.files, vec![cwd.join("rel/nix.conf"), cwd.join("u.conf")]);
    }
}
