//! Nix's remote builders as data: the `builders` setting parsed the way Nix 2.8 parses it, and
//! what Nix would do with a NixOS VM test given those builders and this machine's own settings.
//! Pure: files named by `@FILE` are read through a closure, so table tests need no files.
//!
//! A `builders` value is a list of machine specifications separated by `;` or newlines; `#`
//! starts a comment (to the end of the entry); an entry `@FILE` reads more entries from `FILE`
//! (a missing file adds none, as in Nix). Nix's default is `@$NIX_CONF_DIR/machines`. A machine
//! is up to eight whitespace-separated fields, `-` (or absence) meaning "default":
//! `URI SYSTEMS SSH-KEY MAX-JOBS SPEED-FACTOR SUPPORTED-FEATURES MANDATORY-FEATURES HOST-KEY`,
//! lists comma-separated, the host key base64 (of an OpenSSH public key line). A URI without
//! `://` is `ssh://URI`.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

/// The features every NixOS VM test requires (`requiredSystemFeatures`).
pub(crate) const VM_TEST_FEATURES: [&str; 2] = ["kvm", "nixos-test"];

/// Includes (`@FILE` inside `@FILE`) nested deeper than this are ignored (Nix recurses forever).
const MAX_NESTING: u32 = 8;

/// Where a machine specification was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// A file, or the setting's source (e.g. `NIX_CONFIG`, `/etc/nix/nix.conf`).
    pub source: String,
    /// 1-based line within `source` (for a setting: the line of its value, usually 1).
    pub line: usize,
    /// 1-based position among the `;`-separated entries of that line, when it has several.
    pub entry: Option<usize>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}", self.source, self.line)?;
        match self.entry {
            Some(e) => write!(f, " entry {e}"),
            None => Ok(()),
        }
    }
}

/// One remote builder, every field of its machine line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Machine {
    /// The store URI (`ssh://` prefixed when written without a scheme).
    pub uri: String,
    /// The systems it builds for (default: this machine's system).
    pub systems: Vec<String>,
    /// The SSH identity file Nix passes as `ssh -i`.
    pub ssh_key: Option<String>,
    /// Builds at once (default 1).
    pub max_jobs: u32,
    /// Preference among builders (default 1; higher is preferred).
    pub speed_factor: u32,
    pub supported_features: BTreeSet<String>,
    /// Features a derivation must require to be built there.
    pub mandatory_features: BTreeSet<String>,
    /// The base64 of the host's OpenSSH public key line (Nix writes it into a known_hosts file).
    pub host_key: Option<String>,
    pub origin: Origin,
}

/// A malformed machine line (doctor reports it as a finding).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: `{text}`: {reason}")]
pub(crate) struct BadLine {
    pub origin: Origin,
    pub text: String,
    pub reason: String,
    /// Nix rejects it (and with it every remote build); otherwise Nix accepts it, but not as
    /// meant (more than eight fields: Nix ignores the rest).
    pub fatal: bool,
}

/// The parsed list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Machines {
    pub machines: Vec<Machine>,
    pub bad: Vec<BadLine>,
    /// `@FILE`s that were read or looked for, with whether they existed.
    pub files: Vec<(PathBuf, bool)>,
}

/// Parse a `builders` value (from `source`), reading `@FILE`s with `read` (which returns
/// `NotFound` for a missing file).
pub(crate) fn parse(
    value: &str,
    source: &str,
    read: &dyn Fn(&Path) -> io::Result<String>,
) -> Machines {
    let mut out = Machines::default();
    expand(value, source, read, 0, &mut out);
    out
}

fn expand(
    text: &str,
    source: &str,
    read: &dyn Fn(&Path) -> io::Result<String>,
    depth: u32,
    out: &mut Machines,
) {
    for (n, line) in text.split('\n').enumerate() {
        let entries: Vec<&str> = line
            .split(';')
            .map(|e| e.split('#').next().unwrap_or("").trim())
            .collect();
        let several = entries.iter().filter(|e| !e.is_empty()).count() > 1;
        for (k, entry) in entries.into_iter().enumerate() {
            if entry.is_empty() {
                continue;
            }
            let origin = Origin {
                source: source.to_string(),
                line: n + 1,
                entry: several.then_some(k + 1),
            };
            if let Some(file) = entry.strip_prefix('@') {
                let file = PathBuf::from(file.trim());
                if depth >= MAX_NESTING {
                    out.bad.push(BadLine {
                        origin: origin.clone(),
                        text: entry.to_string(),
                        reason: format!("@FILE nested more than {MAX_NESTING} deep"),
                        fatal: false,
                    });
                    continue;
                }
                match read(&file) {
                    Ok(t) => {
                        out.files.push((file.clone(), true));
                        expand(&t, &file.display().to_string(), read, depth + 1, out);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        out.files.push((file, false));
                    }
                    Err(e) => out.bad.push(BadLine {
                        origin: origin.clone(),
                        text: entry.to_string(),
                        reason: format!("cannot read {}: {e}", file.display()),
                        fatal: true,
                    }),
                }
                continue;
            }
            match parse_machine(entry, &origin) {
                Ok(m) => out.machines.push(m),
                Err((reason, fatal)) => out.bad.push(BadLine {
                    origin: origin.clone(),
                    text: entry.to_string(),
                    reason,
                    fatal,
                }),
            }
        }
    }
}

/// One machine specification (already stripped of comments). Errors: why, and whether Nix
/// rejects it too.
fn parse_machine(entry: &str, origin: &Origin) -> Result<Machine, (String, bool)> {
    let fields: Vec<&str> = entry.split_whitespace().collect();
    if fields.len() > 8 {
        // Nix ignores extra columns; a ninth word is almost always a mistake (a space in a list).
        return Err((
            format!(
                "{} fields, at most 8 (URI SYSTEMS SSH-KEY MAX-JOBS SPEED-FACTOR SUPPORTED-FEATURES MANDATORY-FEATURES HOST-KEY); Nix ignores the rest, so the fields are not what they seem (a space in a comma-separated list?)",
                fields.len()
            ),
            false,
        ));
    }
    parse_fields(&fields, origin).map_err(|r| (r, true))
}

fn parse_fields(fields: &[&str], origin: &Origin) -> Result<Machine, String> {
    let field = |i: usize| fields.get(i).copied().filter(|f| *f != "-");
    let list = |i: usize| -> Vec<String> {
        field(i)
            .map(|f| {
                f.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let number = |i: usize, name: &str| -> Result<u32, String> {
        match field(i) {
            None => Ok(1),
            Some(f) => f
                .parse()
                .map_err(|_| format!("{name} (field {}) `{f}` is not a whole number", i + 1)),
        }
    };
    let uri = field(0).ok_or("no store URI in the first field")?;
    let uri = if uri.contains("://") {
        uri.to_string()
    } else {
        format!("ssh://{uri}")
    };
    let host_key = match field(7) {
        None => None,
        Some(k) => {
            let decoded = base64_decode(k)
                .ok_or_else(|| format!("host key (field 8) `{k}` is not base64"))?;
            let line = String::from_utf8_lossy(&decoded);
            if line.split_whitespace().count() < 2 {
                return Err(format!(
                    "host key (field 8) decodes to `{}`, not an OpenSSH public key line (`ssh-ed25519 AAAA...`; `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub` on the builder)",
                    line.trim()
                ));
            }
            Some(k.to_string())
        }
    };
    let systems = list(1);
    Ok(Machine {
        uri,
        systems: if systems.is_empty() {
            vec![this_system()]
        } else {
            systems
        },
        ssh_key: field(2).map(str::to_string),
        max_jobs: number(3, "max jobs")?,
        speed_factor: number(4, "speed factor")?,
        supported_features: list(5).into_iter().collect(),
        mandatory_features: list(6).into_iter().collect(),
        host_key,
        origin: origin.clone(),
    })
}

/// This machine's Nix system, e.g. `x86_64-linux`.
pub(crate) fn this_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Standard base64 (padding optional), as Nix's `base64Decode` accepts it.
pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    let mut padding = false;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                padding = true;
                continue;
            }
            _ => return None,
        };
        if padding {
            return None;
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

impl Machine {
    /// The host part of the URI: no scheme, no `user@`, no `?params` (e.g. `10.0.0.2`).
    pub(crate) fn host(&self) -> &str {
        let rest = self
            .uri
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or(&self.uri);
        let rest = rest.split('?').next().unwrap_or(rest);
        let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
        rest.trim_end_matches('/')
    }

    /// `user@host` as ssh is given it.
    pub(crate) fn ssh_target(&self) -> &str {
        let rest = self
            .uri
            .split_once("://")
            .map(|(_, r)| r)
            .unwrap_or(&self.uri);
        rest.split('?').next().unwrap_or(rest)
    }

    /// `ssh`, `ssh-ng`, ...
    pub(crate) fn scheme(&self) -> &str {
        self.uri.split_once("://").map(|(s, _)| s).unwrap_or("ssh")
    }

    /// The store URI with the machine line's key and host key as store parameters, as Nix
    /// opens a builder's store (`ssh-key`, `base64-ssh-public-host-key`).
    pub(crate) fn store_uri(&self) -> String {
        let mut uri = self.uri.clone();
        if matches!(self.scheme(), "ssh" | "ssh-ng") {
            let mut params = Vec::new();
            if let Some(k) = &self.ssh_key {
                params.push(format!("ssh-key={k}"));
            }
            if let Some(k) = &self.host_key {
                params.push(format!("base64-ssh-public-host-key={k}"));
            }
            for p in params {
                uri.push(if uri.contains('?') { '&' } else { '?' });
                uri.push_str(&p);
            }
        }
        uri
    }

    /// Whether it builds `system` at all (Nix: `builtin` derivations go anywhere).
    pub(crate) fn builds_system(&self, system: &str) -> bool {
        system == "builtin" || self.systems.iter().any(|s| s == system)
    }

    /// Nix's choice rule: every required feature is supported or mandatory, and every mandatory
    /// feature is required.
    pub(crate) fn accepts(&self, required: &[&str]) -> bool {
        required
            .iter()
            .all(|f| self.supported_features.contains(*f) || self.mandatory_features.contains(*f))
            && self
                .mandatory_features
                .iter()
                .all(|m| required.contains(&m.as_str()))
    }

    /// The machine line in Nix's format (`-` for empty fields), e.g. for `--builders`.
    pub(crate) fn line(&self) -> String {
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.iter().cloned().collect::<Vec<_>>().join(",")
            }
        };
        [
            self.uri.clone(),
            self.systems.join(","),
            self.ssh_key.clone().unwrap_or_else(|| "-".into()),
            self.max_jobs.to_string(),
            self.speed_factor.to_string(),
            list(&self.supported_features),
            list(&self.mandatory_features),
            self.host_key.clone().unwrap_or_else(|| "-".into()),
        ]
        .join(" ")
    }

    /// The line's fields in words.
    pub(crate) fn describe(&self) -> String {
        let list = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.iter().cloned().collect::<Vec<_>>().join(",")
            }
        };
        format!(
            "systems {}, ssh key {}, max jobs {}, speed factor {}, supported features {}, mandatory features {}, host key {}",
            self.systems.join(","),
            self.ssh_key.as_deref().unwrap_or("-"),
            self.max_jobs,
            self.speed_factor,
            list(&self.supported_features),
            list(&self.mandatory_features),
            if self.host_key.is_some() {
                "given"
            } else {
                "- (ssh's known_hosts)"
            },
        )
    }
}

/// This machine as a builder of last resort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Local {
    pub system: String,
    pub features: Vec<String>,
    /// `max-jobs` (0: never build locally).
    pub max_jobs: u32,
}

/// What Nix would do with a VM test (`requiredSystemFeatures = [ "kvm" "nixos-test" ]`) here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Hand it to these builders (best first: Nix prefers the least loaded, then the fastest).
    Remote(Vec<usize>),
    /// No builder takes it; build it here.
    Local,
    /// Refuse: no builder and not here (why).
    Refuse(String),
}

/// Nix 2.8's decision: the build hook is asked first (a VM test does not `preferLocalBuild`);
/// it declines when no builder has the system and features; then the local machine builds it
/// when it has the features and `max-jobs` > 0; else Nix refuses.
pub(crate) fn plan(machines: &[Machine], local: &Local) -> Plan {
    let mut fit: Vec<usize> = (0..machines.len())
        .filter(|&i| {
            machines[i].builds_system(&local.system) && machines[i].accepts(&VM_TEST_FEATURES)
        })
        .collect();
    if !fit.is_empty() {
        fit.sort_by_key(|&i| std::cmp::Reverse(machines[i].speed_factor));
        return Plan::Remote(fit);
    }
    let lacks: Vec<&str> = VM_TEST_FEATURES
        .into_iter()
        .filter(|f| !local.features.iter().any(|x| x == f))
        .collect();
    if lacks.is_empty() && local.max_jobs > 0 {
        return Plan::Local;
    }
    Plan::Refuse(if !lacks.is_empty() {
        format!(
            "a '{}' with features {{kvm, nixos-test}} is required to build, but this machine lacks {} and no builder advertises both",
            local.system,
            lacks.join(", ")
        )
    } else {
        "max-jobs = 0 and no builder advertises {kvm, nixos-test}: `unable to start any build; either increase '--max-jobs' or enable remote builds`".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_files(_: &Path) -> io::Result<String> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }

    /// An ed25519 public key line's base64.
    const HOST_KEY: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSU9rdHRwUnNtYk5Hdk9XTGJKMWhyeUdhNmFCWkN0eG8xbllGT3Q1cUpCZkEgcm9vdEBiCg==";

    #[test]
    fn machine_lines() {
        /// (uri, systems, key, max jobs, speed, supported, mandatory, host key given)
        type Fields = (
            &'static str,
            &'static str,
            Option<&'static str>,
            u32,
            u32,
            &'static str,
            &'static str,
            bool,
        );
        struct Case {
            what: &'static str,
            line: &'static str,
            /// The fields, or a part of the reason the line is bad.
            want: Result<Fields, &'static str>,
        }
        let cases = [
            Case {
                what: "URI only: defaults, ssh:// added",
                line: "builder1",
                want: Ok(("ssh://builder1", "SYS", None, 1, 1, "", "", false)),
            },
            Case {
                what: "every field",
                line: "ssh-ng://root@b x86_64-linux,aarch64-linux /k 4 2 kvm,nixos-test,big-parallel benchmark c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSU9rdHRwUnNtYk5Hdk9XTGJKMWhyeUdhNmFCWkN0eG8xbllGT3Q1cUpCZkEgcm9vdEBiCg==",
                want: Ok((
                    "ssh-ng://root@b",
                    "x86_64-linux,aarch64-linux",
                    Some("/k"),
                    4,
                    2,
                    "big-parallel,kvm,nixos-test",
                    "benchmark",
                    true,
                )),
            },
            Case {
                what: "dashes are empty fields",
                line: "ssh://a - - - - kvm - -",
                want: Ok(("ssh://a", "SYS", None, 1, 1, "kvm", "", false)),
            },
            Case {
                what: "tabs and runs of spaces",
                line: "ssh://a\tx86_64-linux   /key\t8",
                want: Ok(("ssh://a", "x86_64-linux", Some("/key"), 8, 1, "", "", false)),
            },
            Case {
                what: "remote-store parameter kept in the URI",
                line: "ssh-ng://root@10.0.0.2?remote-store=/tmp/r x86_64-linux",
                want: Ok((
                    "ssh-ng://root@10.0.0.2?remote-store=/tmp/r",
                    "x86_64-linux",
                    None,
                    1,
                    1,
                    "",
                    "",
                    false,
                )),
            },
            Case {
                what: "max jobs not a number",
                line: "ssh://a x86_64-linux - four",
                want: Err("max jobs (field 4) `four`"),
            },
            Case {
                what: "negative speed factor",
                line: "ssh://a x86_64-linux - 1 -2",
                want: Err("speed factor (field 5) `-2`"),
            },
            Case {
                what: "host key not base64",
                line: "ssh://a - - - - - - not*base64",
                want: Err("not base64"),
            },
            Case {
                what: "host key base64 of something else",
                line: "ssh://a - - - - - - aGVsbG8=",
                want: Err("not an OpenSSH public key line"),
            },
            Case {
                what: "a space inside a feature list",
                line: "ssh://a x86_64-linux - 1 1 kvm, nixos-test - - x",
                want: Err("10 fields"),
            },
        ];
        for c in cases {
            let got = parse(c.line, "test", &no_files);
            match c.want {
                Ok((uri, systems, key, jobs, speed, sup, mand, hk)) => {
                    assert!(got.bad.is_empty(), "{}: {:?}", c.what, got.bad);
                    let m = &got.machines[0];
                    let systems = systems.replace("SYS", &this_system());
                    let join =
                        |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
                    assert_eq!(m.uri, uri, "{}", c.what);
                    assert_eq!(m.systems.join(","), systems, "{}", c.what);
                    assert_eq!(m.ssh_key.as_deref(), key, "{}", c.what);
                    assert_eq!((m.max_jobs, m.speed_factor), (jobs, speed), "{}", c.what);
                    assert_eq!(join(&m.supported_features), sup, "{}", c.what);
                    assert_eq!(join(&m.mandatory_features), mand, "{}", c.what);
                    assert_eq!(m.host_key.is_some(), hk, "{}", c.what);
                }
                Err(part) => {
                    assert!(got.machines.is_empty(), "{}: {:?}", c.what, got.machines);
                    assert_eq!(got.bad.len(), 1, "{}", c.what);
                    assert!(
                        got.bad[0].reason.contains(part),
                        "{}: {}",
                        c.what,
                        got.bad[0]
                    );
                    assert_eq!(got.bad[0].text, c.line.split('#').next().unwrap().trim());
                }
            }
        }
    }

    #[test]
    fn lists_comments_and_files() {
        let read = |p: &Path| -> io::Result<String> {
            match p.to_str().unwrap() {
                "/etc/nix/machines" => Ok("# fleet\nssh://a x86_64-linux\n\nssh://b - - 2 # two jobs\nssh://bad - - x\n@/etc/nix/more\n".into()),
                "/etc/nix/more" => Ok("ssh://c".into()),
                "/etc/nix/denied" => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
                _ => Err(io::Error::from(io::ErrorKind::NotFound)),
            }
        };
        let got = parse(
            "ssh://x; ssh://y # comment; not a machine\n@/etc/nix/machines ; @/nowhere;@/etc/nix/denied",
            "NIX_CONFIG",
            &read,
        );
        let uris: Vec<&str> = got.machines.iter().map(|m| m.uri.as_str()).collect();
        // Nix splits on `;` first, then cuts each entry at `#`: "not a machine" is an entry
        // (URI `not`, systems `a`, key `machine`), which Nix accepts too.
        assert_eq!(
            uris,
            [
                "ssh://x",
                "ssh://y",
                "ssh://not",
                "ssh://a",
                "ssh://b",
                "ssh://c"
            ]
        );
        assert_eq!(got.machines[4].max_jobs, 2);
        assert_eq!(
            got.machines[4].origin,
            Origin {
                source: "/etc/nix/machines".into(),
                line: 4,
                entry: None,
            }
        );
        assert_eq!(got.machines[0].origin.source, "NIX_CONFIG");
        assert_eq!(got.bad.len(), 2, "{:?}", got.bad);
        assert_eq!(
            got.bad[0].origin,
            Origin {
                source: "/etc/nix/machines".into(),
                line: 5,
                entry: None,
            }
        );
        assert!(
            got.bad[0]
                .to_string()
                .starts_with("/etc/nix/machines line 5: `ssh://bad - - x`"),
            "{}",
            got.bad[0]
        );
        assert!(
            got.bad[1].reason.contains("cannot read /etc/nix/denied"),
            "{:?}",
            got.bad
        );
        assert_eq!(
            got.bad[1].origin,
            Origin {
                source: "NIX_CONFIG".into(),
                line: 2,
                entry: Some(3),
            }
        );
        assert!(got.files.contains(&(PathBuf::from("/nowhere"), false)));
        assert!(got.files.contains(&(PathBuf::from("/etc/nix/more"), true)));
    }

    #[test]
    fn nested_files_stop() {
        let read = |_: &Path| -> io::Result<String> { Ok("@/loop\n".into()) };
        let got = parse("@/loop", "x", &read);
        assert!(got.machines.is_empty());
        assert_eq!(got.bad.len(), 1);
        assert!(got.bad[0].reason.contains("nested"), "{:?}", got.bad);
    }

    #[test]
    fn uri_parts_and_store_uri() {
        let got = parse(
            &format!(
                "ssh-ng://root@10.1.2.3?remote-store=/r - /id - - kvm - {HOST_KEY}\nbare-host"
            ),
            "t",
            &no_files,
        );
        let m = &got.machines[0];
        assert_eq!(m.host(), "10.1.2.3");
        assert_eq!(m.ssh_target(), "root@10.1.2.3");
        assert_eq!(m.scheme(), "ssh-ng");
        assert_eq!(
            m.store_uri(),
            format!(
                "ssh-ng://root@10.1.2.3?remote-store=/r&ssh-key=/id&base64-ssh-public-host-key={HOST_KEY}"
            )
        );
        let b = &got.machines[1];
        assert_eq!(
            (b.host(), b.scheme(), b.store_uri().as_str()),
            ("bare-host", "ssh", "ssh://bare-host")
        );
        // The line round-trips.
        let again = parse(&m.line(), "t", &no_files).machines;
        assert_eq!(again[0].line(), m.line());
        assert_eq!(
            (again[0].uri.as_str(), again[0].ssh_key.as_deref()),
            (m.uri.as_str(), Some("/id"))
        );
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a=b").is_none());
        assert!(base64_decode("a b").is_none());
    }

    #[test]
    fn what_nix_does_with_a_vm_test() {
        let ms = parse(
            "ssh://slow x86_64-linux - 1 1 kvm,nixos-test\n\
             ssh://fast x86_64-linux - 1 5 kvm,nixos-test,big-parallel\n\
             ssh://nokvm x86_64-linux - 1 9 nixos-test\n\
             ssh://arm aarch64-linux - 1 9 kvm,nixos-test\n\
             ssh://mand x86_64-linux - 1 9 kvm,nixos-test benchmark\n\
             ssh://mandok x86_64-linux - 1 0 - kvm,nixos-test",
            "t",
            &no_files,
        )
        .machines;
        let local = |features: &[&str], max_jobs| Local {
            system: "x86_64-linux".into(),
            features: features.iter().map(|s| s.to_string()).collect(),
            max_jobs,
        };
        let full = local(&["kvm", "nixos-test"], 1);
        // Fastest first; machines without kvm, of another system, or with a mandatory feature
        // the test does not require are not candidates; mandatory {kvm,nixos-test} is.
        assert_eq!(plan(&ms, &full), Plan::Remote(vec![1, 0, 5]));
        assert_eq!(plan(&ms[2..5], &full), Plan::Local);
        assert!(
            matches!(plan(&ms[2..5], &local(&["kvm", "nixos-test"], 0)), Plan::Refuse(r) if r.contains("max-jobs = 0"))
        );
        assert!(
            matches!(plan(&[], &local(&["nixos-test"], 4)), Plan::Refuse(r) if r.contains("lacks kvm"))
        );
    }
}
