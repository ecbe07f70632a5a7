//! The Nix side of KVM: which users Nix builds as, whether *they* can open `/dev/kvm` inside the
//! sandbox (where supplementary groups are dropped), `system-features` (explicit or Nix's
//! default, which adds `kvm` only when the Nix process can open `/dev/kvm`), `sandbox`,
//! `auto-allocate-uids`; and `--nix-probe`, a real build that opens `/dev/kvm`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drydock_gc::NixConf;

use super::access::{acl_rw_groups, rw_access};
use super::kvm::{KVM_PATH, KvmReport, describe_device};
use super::{Finding, Status};
use crate::host::Host;
use crate::spawn as command;

const PROBE_DEADLINE: Duration = Duration::from_secs(180);

fn truthy(v: &str) -> bool {
    matches!(v, "true" | "1" | "yes")
}

/// Whether a Nix installation is visible at all.
fn nix_present(host: &Host) -> bool {
    !host.is_real() || command::which("nix-build").is_some() || host.exists("/nix/var/nix")
}

/// `chroot`: the store is a chroot store (`--store ROOT`), for which Nix always sandboxes.
pub(crate) fn check(host: &Host, conf: &NixConf, kvm: &KvmReport, chroot: bool) -> Vec<Finding> {
    if !nix_present(host) && conf.is_empty() {
        return vec![
            Finding::new(
                "nix",
                Status::Warn,
                "Nix not found: Nix settings not checked",
            )
            .detail("no nix-build on PATH and no /nix/var/nix"),
        ];
    }
    let creds = host.creds().ok();
    let as_root = creds.as_ref().is_some_and(|c| c.euid == 0);
    let daemon = host.exists("/nix/var/nix/daemon-socket/socket");
    let mut out = Vec::new();

    // system-features
    let (features, feat_src) = system_features(host, conf, kvm);
    let has = |f: &str| features.iter().any(|x| x == f);
    let missing: Vec<&str> = ["kvm", "nixos-test"]
        .into_iter()
        .filter(|f| !has(f))
        .collect();
    out.push(if missing.is_empty() {
        Finding::new("nix.system-features", Status::Pass, "system-features include kvm and nixos-test")
            .detail(format!("system-features = {} ({feat_src})", features.join(" ")))
    } else {
        Finding::new(
            "nix.system-features",
            Status::Warn,
            format!("system-features lack {}: Nix will refuse to build VM tests here", missing.join(" and ")),
        )
        .detail(format!(
            "system-features = {} ({feat_src}); NixOS VM tests require {{kvm, nixos-test}}: `a 'x86_64-linux' with features {{kvm, nixos-test}} is required to build`",
            features.join(" ")
        ))
        .fix(format!(
            "add to /etc/nix/nix.conf: `extra-system-features = {}` (after making /dev/kvm usable by the build users)",
            missing.join(" ")
        ))
    });

    // sandbox and builder identity
    let sandbox = conf
        .get("sandbox")
        .map(|s| s.value.clone())
        .unwrap_or_else(|| "true".into());
    let sandboxed = sandbox != "false" || chroot;
    let shown = if chroot && sandbox == "false" {
        "sandbox = false, but builds into a chroot store (--store) are always sandboxed".to_string()
    } else {
        format!("sandbox = {sandbox}")
    };
    out.push(
        Finding::new("nix.sandbox", Status::Pass, shown)
            .detail(if sandboxed {
                "builds run in Nix's sandbox: a builder keeps its uid and primary group, but no supplementary groups; Nix bind-mounts /dev/kvm only for derivations requiring the kvm feature"
            } else {
                "builds are not sandboxed: build users keep their supplementary groups from /etc/group"
            }),
    );

    let group_setting = conf.get("build-users-group").map(|s| s.value.clone());
    let build_group = group_setting.clone().unwrap_or_else(|| {
        if as_root || daemon {
            "nixbld".into()
        } else {
            String::new()
        }
    });
    let auto_uids = conf
        .get("auto-allocate-uids")
        .is_some_and(|s| truthy(&s.value));
    out.push(check_builders(
        host,
        kvm,
        &build_group,
        sandboxed,
        auto_uids,
        group_setting.is_some(),
    ));
    out
}

/// This machine's `system-features` (explicit, or Nix's default, which adds `kvm` only when the
/// Nix process can open `/dev/kvm`) and where they come from.
pub(crate) fn system_features(
    host: &Host,
    conf: &NixConf,
    kvm: &KvmReport,
) -> (Vec<String>, String) {
    let as_root = host.creds().ok().is_some_and(|c| c.euid == 0);
    let daemon = host.exists("/nix/var/nix/daemon-socket/socket");
    let kvm_accessible_to_nix = kvm.device.is_some() && (as_root || daemon || kvm.opened);
    match conf.get("system-features") {
        Some(s) => (
            s.value.split_whitespace().map(str::to_string).collect(),
            format!("set in {}", s.source),
        ),
        None => {
            let mut f: Vec<String> = ["nixos-test", "benchmark", "big-parallel"]
                .map(String::from)
                .to_vec();
            if kvm_accessible_to_nix {
                f.push("kvm".into());
            }
            (
                f,
                "Nix's default (adds kvm only when the Nix process can open /dev/kvm)".into(),
            )
        }
    }
}

fn check_builders(
    host: &Host,
    kvm: &KvmReport,
    build_group: &str,
    sandboxed: bool,
    auto_uids: bool,
    group_explicit: bool,
) -> Finding {
    let id = "nix.build-users";
    let Some(dev) = &kvm.device else {
        return Finding::new(
            id,
            Status::Warn,
            "Nix builders' access to /dev/kvm not checked: no /dev/kvm",
        );
    };
    let devdesc = describe_device(host, dev);
    let acl_fix = |g: &str| {
        format!(
            "make /dev/kvm usable by builds: a udev rule `KERNEL==\"kvm\", MODE=\"0666\"` (e.g. /etc/udev/rules.d/99-kvm.rules, then `udevadm trigger --name-match=kvm`), or an ACL for the build group: `setfacl -m g:{g}:rw /dev/kvm` (add it to the udev rule with RUN+=\"/usr/bin/setfacl -m g:{g}:rw $env{{DEVNAME}}\" to survive reboots)"
        )
    };
    if auto_uids {
        let ok = dev.mode & 0o006 == 0o006;
        return if ok {
            Finding::new(
                id,
                Status::Pass,
                "auto-allocated build uids can open /dev/kvm (world read-write)",
            )
            .detail(format!("/dev/kvm is {devdesc}"))
        } else {
            Finding::new(id, Status::Warn, "auto-allocated build uids cannot open /dev/kvm")
                .detail(format!("auto-allocate-uids = true: builders run as uids from a reserved range with no supplementary groups; /dev/kvm is {devdesc}"))
                .fix("a udev rule `KERNEL==\"kvm\", MODE=\"0666\"` (then `udevadm trigger --name-match=kvm`)")
        };
    }
    if build_group.is_empty() {
        let who = host.creds().ok();
        let ok = who
            .as_ref()
            .map(|c| rw_access(dev, c.euid, c.egid, &c.groups).is_ok())
            .unwrap_or(false);
        return Finding::new(
            id,
            if ok { Status::Pass } else { Status::Warn },
            if ok {
                "builds run as you, and you can open /dev/kvm"
            } else {
                "builds run as you, and you cannot open /dev/kvm"
            },
        )
        .detail(format!(
            "build-users-group is empty (single-user Nix); /dev/kvm is {devdesc}"
        ))
        .maybe_fix((!ok).then_some("see kvm.access"));
    }
    let groups = host.groups();
    let Some(group) = groups.iter().find(|g| g.name == build_group) else {
        return Finding::new(
            id,
            Status::Fail,
            format!("build-users-group '{build_group}' does not exist: Nix cannot build"),
        )
        .detail(format!(
            "build-users-group = {build_group} ({}) but /etc/group has no such group",
            if group_explicit { "set in nix.conf" } else { "Nix's default when run as root or by the daemon" }
        ))
        .fix(format!("create the build users (`groupadd -r {build_group}` and members `{build_group}1..N`), or set `build-users-group =` for single-user Nix"));
    };
    let users = host.users();
    let members: Vec<_> = group
        .members
        .iter()
        .filter_map(|m| users.iter().find(|u| &u.name == m))
        .collect();
    if members.is_empty() {
        return Finding::new(id, Status::Fail, format!("build group '{build_group}' has no members: Nix cannot build"))
            .fix(format!("add build users to '{build_group}' (e.g. `useradd -r -g {build_group} -G {build_group} {build_group}1`)"));
    }
    let can: Vec<&str> = members
        .iter()
        .filter(|u| {
            let supp: Vec<u32> = if sandboxed {
                Vec::new()
            } else {
                groups
                    .iter()
                    .filter(|g| g.members.iter().any(|m| m == &u.name))
                    .map(|g| g.gid)
                    .collect()
            };
            rw_access(dev, u.uid, group.gid, &supp).is_ok()
        })
        .map(|u| u.name.as_str())
        .collect();
    let names = if members.len() > 3 {
        format!(
            "{}..{}, {} users",
            members[0].name,
            members[members.len() - 1].name,
            members.len()
        )
    } else {
        members
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ctx = format!(
        "Nix builds as {names}, group {build_group} (gid {}){}; /dev/kvm is {devdesc}",
        group.gid,
        if sandboxed {
            ", without supplementary groups inside the sandbox"
        } else {
            ""
        }
    );
    if can.len() == members.len() {
        let how = if dev.mode & 0o006 == 0o006 {
            "world read-write".to_string()
        } else if acl_rw_groups(dev).contains(&group.gid) {
            format!("an ACL for group {build_group}")
        } else {
            "their uid/group".to_string()
        };
        Finding::new(
            id,
            Status::Pass,
            format!("Nix build users can open /dev/kvm ({how})"),
        )
        .detail(ctx)
    } else {
        let manual = if kvm.opened {
            "manual runs work, but "
        } else {
            ""
        };
        Finding::new(
            id,
            Status::Warn,
            format!("Nix build users cannot open /dev/kvm: {manual}`nix build` of a VM test will not"),
        )
        .detail(format!(
            "{ctx}; {} of {} build users can open it. A VM test built by Nix fails with `Could not access KVM kernel module: Permission denied`",
            can.len(),
            members.len()
        ))
        .fix(acl_fix(build_group))
    }
}

/// What the probe build's builder saw inside its sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeSeen {
    /// `ok`, `denied` or `absent`.
    pub verdict: String,
    /// The builder's credentials, readable ("uid 1000, gid 100, ...").
    pub ids: String,
    /// How opening `/dev/kvm` failed ("EACCES (Permission denied)"), when it did.
    pub errno: Option<String>,
    pub out_path: String,
    /// Where the report was read.
    pub report: String,
}

/// Why the probe build gave no report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeFailed {
    pub summary: String,
    /// The last lines of Nix's output.
    pub detail: String,
    /// Nix refused for want of a machine with the required features (or a reachable one).
    pub refused: bool,
}

impl ProbeFailed {
    fn new(summary: impl Into<String>) -> Self {
        Self {
            summary: summary.into(),
            detail: String::new(),
            refused: false,
        }
    }
}

/// Build a derivation requiring `features` whose builder opens `/dev/kvm` inside the sandbox
/// and writes what happened to `$out`; `extra` are more `nix-build` arguments (`--builders`,
/// `--max-jobs 0`), `env` more environment (`NIX_SSHOPTS`).
pub(crate) fn build_probe(
    store_root: Option<&Path>,
    conf: &NixConf,
    features: &[&str],
    extra: &[String],
    env: &[(&str, String)],
) -> Result<ProbeSeen, ProbeFailed> {
    let Some(nix_build) = command::which("nix-build") else {
        return Err(ProbeFailed::new("nix-build not found on PATH"));
    };
    let dir = tempfile_dir()
        .map_err(|e| ProbeFailed::new(format!("cannot create a temporary directory: {e}")))?;
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let expr = dir.join(format!("probe-{nonce}.nix"));
    let script = r#"if ( exec 3<>/dev/kvm ) 2>/dev/null; then r=ok; elif [ -e /dev/kvm ]; then r=denied; else r=absent; fi; ids=""; while read -r k a b c d; do case "$k" in Uid:|Gid:|Groups:) ids="$ids $k $a $b $c $d;";; esac; done < /proc/self/status; e=""; if [ "$r" = denied ]; then e=$( { exec 3<>/dev/kvm; } 2>&1 ); fi; m=""; if read -r x y z < /proc/self/uid_map; then m="$x $y $z"; fi; echo "$r$ids Map: $m; Err: $e;" > "$out""#;
    let features = features
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(" ");
    let text = format!(
        "derivation {{\n  name = \"drydock-kvm-probe\";\n  system = builtins.currentSystem;\n  builder = \"/bin/sh\";\n  args = [ \"-c\" {script:?} ];\n  requiredSystemFeatures = [ {features} ];\n  nonce = \"{nonce}\";\n}}\n"
    );
    if let Err(e) = std::fs::write(&expr, text) {
        let _ = std::fs::remove_file(&expr);
        let _ = std::fs::remove_dir(&dir);
        return Err(ProbeFailed::new(format!(
            "cannot write {}: {e}",
            expr.display()
        )));
    }
    let mut cmd = Command::new(nix_build);
    // No substituters: the probe is unique, and a cache lookup without network only delays.
    cmd.arg(&expr)
        .arg("--no-out-link")
        .args(["--option", "substituters", ""])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(root) = store_root {
        cmd.arg("--store").arg(root);
    }
    // A sandbox needs a shell; where Nix has no default one, lend it a static busybox.
    let has_sandbox_shell = conf.get("sandbox-paths").is_some_and(|s| {
        s.value
            .split_whitespace()
            .any(|p| p.starts_with("/bin/sh="))
    });
    if !has_sandbox_shell {
        if let Some(bb) = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        {
            cmd.args(["--option", "extra-sandbox-paths", &format!("/bin/sh={bb}")]);
        }
    }
    let result = command::run_captured(cmd, PROBE_DEADLINE);
    let _ = std::fs::remove_file(&expr);
    // Other probes may still use the directory: removed only once empty.
    let _ = std::fs::remove_dir(&dir);
    let r = result.map_err(|e| ProbeFailed::new(format!("cannot run nix-build: {e}")))?;
    if r.timed_out {
        return Err(ProbeFailed::new(format!(
            "nix-build did not finish within {} s",
            PROBE_DEADLINE.as_secs()
        )));
    }
    if r.code != Some(0) {
        let refused = r.stderr.contains("required system feature")
            || r.stderr.contains("is required to build")
            || r.stderr.contains("unable to start any build");
        return Err(ProbeFailed {
            summary: "the probe build failed".into(),
            detail: last_lines(&r.stderr, 6),
            refused,
        });
    }
    let out_path = r.stdout.lines().last().unwrap_or("").trim().to_string();
    let physical = match store_root {
        Some(root) => root.join(out_path.trim_start_matches('/')),
        None => PathBuf::from(&out_path),
    };
    let report = std::fs::read_to_string(&physical).unwrap_or_default();
    let (verdict, ids) = report.trim().split_once(' ').unwrap_or((report.trim(), ""));
    Ok(ProbeSeen {
        verdict: verdict.to_string(),
        ids: describe_probe_ids(ids),
        errno: probe_errno(ids),
        out_path,
        report: format!("{}: {report:?}", physical.display()),
    })
}

/// The last `n` lines of `text`, in order.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Build, on this machine, a derivation requiring the `kvm` feature whose builder opens
/// `/dev/kvm` inside the sandbox and writes what happened to `$out`.
pub(crate) fn probe(host: &Host, store_root: Option<&Path>, conf: &NixConf) -> Finding {
    let id = "nix.probe";
    // Built here: with remote builders configured Nix would send it away (each builder has its
    // own probe, `builder.HOST.probe`).
    let local_only = ["--builders".to_string(), String::new()];
    let seen = match build_probe(store_root, conf, &["kvm"], &local_only, &[]) {
        Ok(seen) => seen,
        Err(f) if f.summary.starts_with("nix-build not found") => {
            return Finding::new(id, Status::Fail, f.summary).fix("install Nix");
        }
        Err(f) if f.refused => {
            return Finding::new(id, Status::Fail, "Nix refused: no builder has the kvm system feature")
                .detail(f.detail)
                .fix("make /dev/kvm usable by the build users (see nix.build-users), then `extra-system-features = kvm nixos-test` in nix.conf");
        }
        Err(f) => return Finding::new(id, Status::Fail, f.summary).detail(f.detail),
    };
    let ids = &seen.ids;
    match seen.verdict.as_str() {
        "ok" => Finding::new(id, Status::Pass, "a Nix build opened /dev/kvm inside the sandbox")
            .detail(format!("builder credentials: {ids}; output {}", seen.out_path)),
        "denied" => Finding::new(id, Status::Fail, "inside the Nix sandbox, the builder cannot open /dev/kvm")
            .detail(format!(
                "builder credentials: {ids}; opening /dev/kvm failed: {}; /dev/kvm is {}",
                seen.errno.as_deref().unwrap_or("(no message)"),
                kvm_desc(host)
            ))
            .fix("a udev rule `KERNEL==\"kvm\", MODE=\"0666\"`, or `setfacl -m g:nixbld:rw /dev/kvm` (see nix.build-users)"),
        "absent" => Finding::new(id, Status::Fail, "the Nix sandbox has no /dev/kvm")
            .detail(format!("builder credentials: {ids}"))
            .fix("check `sandbox-paths` and that /dev/kvm exists on the host"),
        _ => Finding::new(id, Status::Fail, "the probe build produced no verdict")
            .detail(seen.report),
    }
}

fn kvm_desc(host: &Host) -> String {
    host.file_info(KVM_PATH)
        .map(|i| describe_device(host, &i))
        .unwrap_or_else(|_| "missing".into())
}

/// "Uid: 1000 1000 1000 1000; Gid: 100 ...; Groups: ;" → "uid 1000, gid 100, no supplementary groups"
fn describe_probe_ids(ids: &str) -> String {
    let field = |name: &str| -> Vec<&str> {
        ids.split(';')
            .find_map(|part| part.trim().strip_prefix(name))
            .map(|rest| rest.split_whitespace().collect())
            .unwrap_or_default()
    };
    let uid = field("Uid:").first().copied().unwrap_or("?");
    let gid = field("Gid:").first().copied().unwrap_or("?");
    let groups = field("Groups:");
    let groups = if groups.is_empty() {
        "no supplementary groups".to_string()
    } else {
        format!("groups {}", groups.join(","))
    };
    // /proc/self/uid_map inside the sandbox: "INSIDE OUTSIDE COUNT" (Nix 2.8's sandbox is a user
    // namespace: uid 1000 inside is the build user, or root, outside).
    let outside = match field("Map:").as_slice() {
        [inside, outside, _] if inside != outside => {
            format!("; uid {outside} outside the sandbox's user namespace")
        }
        _ => String::new(),
    };
    format!("uid {uid}, gid {gid}, {groups} (as seen inside the build){outside}")
}

/// The error the builder's shell printed opening `/dev/kvm` ("sh: can't open '/dev/kvm':
/// Permission denied"), as the errno's name and text: "EACCES (Permission denied)".
fn probe_errno(ids: &str) -> Option<String> {
    let err = ids
        .split(';')
        .find_map(|part| part.trim().strip_prefix("Err:"))?
        .trim();
    let text = err.rsplit(": ").next()?.trim();
    if text.is_empty() {
        return None;
    }
    let name = match text {
        "Permission denied" => "EACCES",
        "Operation not permitted" => "EPERM",
        "No such device" => "ENODEV",
        "No such file or directory" => "ENOENT",
        "No such device or address" => "ENXIO",
        _ => return Some(text.to_string()),
    };
    Some(format!("{name} ({text})"))
}

pub(crate) fn tempfile_dir() -> io::Result<PathBuf> {
    let base = std::env::temp_dir().join(format!("drydock-probe-{}", std::process::id()));
    // A folder another user made under this name first is refused, not written into.
    drydock_gc::private_dir(&base).map_err(io::Error::other)?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::super::DoctorError;
    use super::*;
    use drydock_gc::NixConfSources;

    fn sources() -> NixConfSources {
        NixConfSources {
            files: vec!["/etc/nix/nix.conf".into()],
            inline: Some("extra-system-features = big-parallel".into()),
            conf_dir: "/etc/nix".into(),
        }
    }

    #[test]
    fn reads_the_fixture_tree_with_extras_and_includes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/nix")).unwrap();
        std::fs::write(
            dir.path().join("etc/nix/nix.conf"),
            "# comment\nbuild-users-group = nixbld # trailing\nsystem-features = kvm  nixos-test\ninclude extra.conf\n!include missing.conf\nbogus line\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/nix/extra.conf"), "sandbox = relaxed\n").unwrap();
        let host = Host::at(dir.path());
        let c = NixConf::load(host.root(), &sources()).unwrap();
        assert_eq!(c.get("build-users-group").unwrap().value, "nixbld");
        assert_eq!(
            c.get("system-features").unwrap().value,
            "kvm nixos-test big-parallel"
        );
        assert_eq!(c.get("sandbox").unwrap().value, "relaxed");
        assert!(c.get("bogus line").is_none());
    }

    #[test]
    fn unreadable_conf_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: exists, cannot be read as a file.
        std::fs::create_dir_all(dir.path().join("etc/nix/nix.conf")).unwrap();
        let host = Host::at(dir.path());
        let err = DoctorError::from(NixConf::load(host.root(), &sources()).unwrap_err());
        assert!(err.is_bad_input());
        assert!(
            err.to_string()
                .contains(&host.path("/etc/nix/nix.conf").display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn probe_reports_the_errno_and_the_outer_uid() {
        let report = "Uid: 1000 1000 1000 1000; Gid: 100 100 100 100; Groups: ; Map: 1000 30001 1; Err: sh: can't open '/dev/kvm': Permission denied;";
        assert_eq!(
            probe_errno(report).as_deref(),
            Some("EACCES (Permission denied)")
        );
        assert!(
            describe_probe_ids(report)
                .ends_with("; uid 30001 outside the sandbox's user namespace"),
            "{}",
            describe_probe_ids(report)
        );
        assert_eq!(
            probe_errno("Uid: 0 0 0 0; Map: 0 0 4294967295; Err: ;"),
            None
        );
        assert!(
            !describe_probe_ids("Uid: 0 0 0 0; Map: 0 0 4294967295; Err: ;").contains("outside")
        );
        assert_eq!(
            probe_errno("Err: /bin/sh: 1: cannot open /dev/kvm: Operation not permitted;")
                .as_deref(),
            Some("EPERM (Operation not permitted)")
        );
    }

    #[test]
    fn probe_ids_are_readable() {
        assert_eq!(
            describe_probe_ids("Uid: 1000 1000 1000 1000; Gid: 100 100 100 100; Groups:    ;"),
            "uid 1000, gid 100, no supplementary groups (as seen inside the build)"
        );
        assert!(
            describe_probe_ids(
                "Uid: 30001 30001 30001 30001; Gid: 30000 30000 30000 30000; Groups: 30000 ;"
            )
            .contains("groups 30000")
        );
    }

    #[test]
    fn missing_conf_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::at(dir.path());
        let c = NixConf::load(host.root(), &sources()).unwrap();
        assert!(c.get("sandbox").is_none());
    }
}

#[cfg(test)]
mod builder_tests {
    use super::super::fixture::{self, GROUP, PASSWD, ROOT_STATUS};
    use super::*;
    use crate::host::{AclEntry, AclTag, FileInfo, FileKind};
    use drydock_gc::NixConfSources;

    fn report(mode: u32, acl: Option<Vec<AclEntry>>) -> KvmReport {
        KvmReport {
            findings: Vec::new(),
            device: Some(FileInfo {
                kind: FileKind::CharDevice,
                major: 10,
                minor: 232,
                mode,
                uid: 0,
                gid: 0,
                acl,
            }),
            opened: true,
        }
    }

    fn run(conf: &str, kvm: &KvmReport) -> Vec<Finding> {
        let d = fixture::tree(&[
            ("proc/self/status", ROOT_STATUS),
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
            ("etc/nix/nix.conf", conf),
        ]);
        let host = Host::at(d.path());
        let conf = NixConf::load(
            host.root(),
            &NixConfSources {
                files: vec!["/etc/nix/nix.conf".into()],
                inline: None,
                conf_dir: "/etc/nix".into(),
            },
        )
        .unwrap();
        check(&host, &conf, kvm, false)
    }

    fn by_id<'a>(f: &'a [Finding], id: &str) -> &'a Finding {
        f.iter().find(|x| x.id == id).unwrap()
    }

    #[test]
    fn root_only_device_warns_for_build_users_with_fix() {
        let f = run("", &report(0o600, None));
        let b = by_id(&f, "nix.build-users");
        assert_eq!(b.status, Status::Warn);
        assert!(
            b.summary
                .contains("manual runs work, but `nix build` of a VM test will not"),
            "{b:?}"
        );
        assert!(
            b.detail.contains("nixbld1, nixbld2") && b.detail.contains("0 of 2"),
            "{b:?}"
        );
        let fix = b.fix.as_ref().unwrap();
        assert!(
            fix.contains("KERNEL==\"kvm\", MODE=\"0666\"")
                && fix.contains("setfacl -m g:nixbld:rw /dev/kvm"),
            "{fix}"
        );
        // Nix's default features include kvm because root can open the device.
        assert_eq!(by_id(&f, "nix.system-features").status, Status::Pass);
    }

    #[test]
    fn world_rw_or_group_acl_passes() {
        let f = run("", &report(0o666, None));
        assert_eq!(by_id(&f, "nix.build-users").status, Status::Pass);
        let acl = vec![
            AclEntry {
                tag: AclTag::UserObj,
                perm: 6,
            },
            AclEntry {
                tag: AclTag::GroupObj,
                perm: 0,
            },
            AclEntry {
                tag: AclTag::Group(30000),
                perm: 6,
            },
            AclEntry {
                tag: AclTag::Mask,
                perm: 6,
            },
            AclEntry {
                tag: AclTag::Other,
                perm: 0,
            },
        ];
        let f = run("", &report(0o660, Some(acl)));
        let b = by_id(&f, "nix.build-users");
        assert_eq!(b.status, Status::Pass, "{b:?}");
        assert!(b.summary.contains("ACL for group nixbld"), "{b:?}");
    }

    #[test]
    fn group_membership_only_counts_without_sandbox() {
        // nixbld users are members of kvm in /etc/group; 0660 root:kvm.
        let mut kvm = report(0o660, None);
        kvm.device.as_mut().unwrap().gid = 994;
        let group = GROUP.replace("kvm:x:994:", "kvm:x:994:nixbld1,nixbld2");
        let d = fixture::tree(&[
            ("proc/self/status", ROOT_STATUS),
            ("etc/passwd", PASSWD),
            ("etc/group", &group),
        ]);
        let host = Host::at(d.path());
        let sandboxed = check_builders(&host, &kvm, "nixbld", true, false, false);
        assert_eq!(sandboxed.status, Status::Warn, "{sandboxed:?}");
        assert!(sandboxed.detail.contains("without supplementary groups"));
        let unsandboxed = check_builders(&host, &kvm, "nixbld", false, false, false);
        assert_eq!(unsandboxed.status, Status::Pass, "{unsandboxed:?}");
    }

    #[test]
    fn explicit_features_without_kvm_and_missing_group() {
        let f = run(
            "system-features = benchmark big-parallel\nbuild-users-group = builders\n",
            &report(0o666, None),
        );
        let s = by_id(&f, "nix.system-features");
        assert_eq!(s.status, Status::Warn);
        assert!(s.summary.contains("kvm and nixos-test"), "{s:?}");
        assert!(s.detail.contains("set in /etc/nix/nix.conf"), "{s:?}");
        let b = by_id(&f, "nix.build-users");
        assert_eq!(b.status, Status::Fail);
        assert!(b.summary.contains("'builders' does not exist"), "{b:?}");
    }

    #[test]
    fn auto_allocated_uids_need_world_access() {
        let f = run("auto-allocate-uids = true\n", &report(0o660, None));
        assert_eq!(by_id(&f, "nix.build-users").status, Status::Warn);
    }

    #[test]
    fn sandbox_setting_is_reported() {
        let f = run("sandbox = false\n", &report(0o666, None));
        assert_eq!(by_id(&f, "nix.sandbox").summary, "sandbox = false");
    }

    #[test]
    fn chroot_stores_are_always_sandboxed() {
        let d = fixture::tree(&[
            ("proc/self/status", ROOT_STATUS),
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
            ("etc/nix/nix.conf", "sandbox = false\n"),
        ]);
        let host = Host::at(d.path());
        let conf = NixConf::load(
            host.root(),
            &NixConfSources {
                files: vec!["/etc/nix/nix.conf".into()],
                inline: None,
                conf_dir: "/etc/nix".into(),
            },
        )
        .unwrap();
        let f = check(&host, &conf, &report(0o600, None), true);
        assert!(
            by_id(&f, "nix.sandbox")
                .summary
                .contains("always sandboxed")
        );
        assert!(
            by_id(&f, "nix.build-users")
                .detail
                .contains("without supplementary groups")
        );
    }
}
