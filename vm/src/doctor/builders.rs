//! Nix's remote builders: `nix.builders` (the parsed list and what Nix would do with a VM test
//! here), one `builder.HOST` per builder (reached the way Nix reaches it: `nix store ping` of
//! the store URI with the machine line's key and host key, so ssh gets Nix's own arguments and
//! `NIX_SSHOPTS`), and with `--nix-probe --builders` one `builder.HOST.probe` per builder: the
//! KVM probe build sent there by Nix itself (`--builders` naming only that builder,
//! `--max-jobs 0`).
//!
//! The parsing and the verdicts on ssh's messages are pure (`machines`, [`classify`]); this
//! module runs the programs, each with a deadline, and ssh never waits on a prompt
//! (`-oBatchMode=yes -oConnectTimeout=…` follow `NIX_SSHOPTS`, whose own values win).

use std::path::Path;
use std::time::Duration;

use drydock_gc::{NixConf, NixConfSources};

use super::kvm::KvmReport;
use super::machines::{self, Local, Machine, Machines, Plan, VM_TEST_FEATURES};
use super::nix::{build_probe, last_lines, system_features};
use super::{Finding, Status};
use crate::host::Host;
use crate::spawn as command;

/// Seconds ssh may take to connect (passed as `-oConnectTimeout`).
const CONNECT_TIMEOUT: u64 = 10;
/// The whole `nix store ping`, connection and handshake.
const PING_DEADLINE: Duration = Duration::from_secs(CONNECT_TIMEOUT + 20);

/// Why a builder could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unreachable {
    Dns,
    Refused,
    Timeout,
    Authentication,
    HostKey,
    NoNix,
    Other,
}

/// What ssh's (and Nix's) messages say went wrong.
pub(crate) fn classify(stderr: &str, timed_out: bool) -> Unreachable {
    let has = |s: &str| stderr.contains(s);
    if has("Could not resolve hostname") || has("Name or service not known") {
        Unreachable::Dns
    } else if has("Connection refused") {
        Unreachable::Refused
    } else if has("Host key verification failed")
        || has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("No ED25519 host key is known")
        || has("host key for")
    {
        Unreachable::HostKey
    } else if has("Permission denied (") || has("Too many authentication failures") {
        Unreachable::Authentication
    } else if (has("nix-daemon") || has("nix-store"))
        && (has("not found") || has("No such file or directory"))
    {
        Unreachable::NoNix
    } else if timed_out
        || has("timed out")
        || has("No route to host")
        || has("Network is unreachable")
    {
        Unreachable::Timeout
    } else {
        Unreachable::Other
    }
}

/// The remote command Nix runs for a store URI scheme.
fn remote_command(scheme: &str) -> &'static str {
    match scheme {
        "ssh-ng" => "nix-daemon --stdio",
        "ssh" => "nix-store --serve --write",
        _ => "no ssh (not an ssh store)",
    }
}

/// The finding id for each machine: `builder.HOST`, `builder.HOST-2` for a second one.
fn ids(machines: &[Machine]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in machines {
        let base = format!("builder.{}", m.host());
        let n = out
            .iter()
            .filter(|i| **i == base || i.starts_with(&format!("{base}-")))
            .count();
        out.push(if n == 0 {
            base
        } else {
            format!("{base}-{}", n + 1)
        });
    }
    out
}

/// `NIX_SSHOPTS` for every ssh drydock makes Nix run: the user's, then no prompts and a
/// connect deadline (ssh takes the first value given for an option, so the user's win).
fn ssh_opts() -> String {
    let user = std::env::var("NIX_SSHOPTS").unwrap_or_default();
    format!("{user} -oBatchMode=yes -oConnectTimeout={CONNECT_TIMEOUT}")
        .trim()
        .to_string()
}

/// `nix.builders`, `builder.HOST` and, with `probe`, `builder.HOST.probe`.
pub(crate) fn check(
    host: &Host,
    conf: &NixConf,
    sources: &NixConfSources,
    kvm: &KvmReport,
    store_root: Option<&Path>,
    probe: bool,
) -> Vec<Finding> {
    let setting = conf.builders(sources);
    let parsed = machines::parse(&setting.value, &setting.source, &|p| host.read(p));
    if parsed.machines.is_empty() && parsed.bad.is_empty() {
        if !probe {
            return Vec::new();
        }
        return vec![
            Finding::new(
                "nix.builders",
                Status::Warn,
                "no remote builders configured: --builders had nothing to probe",
            )
            .detail(format!(
                "builders = {} ({}){}",
                setting.value,
                setting.source,
                files_note(&parsed)
            ))
            .fix("list builders in `builders = ...` (nix.conf or NIX_CONFIG) or in /etc/nix/machines"),
        ];
    }
    let (features, _) = system_features(host, conf, kvm);
    let local = Local {
        system: conf
            .get("system")
            .map(|s| s.value.clone())
            .unwrap_or_else(machines::this_system),
        features,
        max_jobs: max_jobs(conf),
    };
    let ids = ids(&parsed.machines);
    let mut out = vec![summary(
        &parsed,
        &setting.value,
        &setting.source,
        &local,
        &ids,
    )];

    if parsed.bad.iter().any(|b| b.fatal) {
        // Nix rejects the whole list: it reaches no builder, so neither does the doctor.
        return out;
    }
    let opts = ssh_opts();
    let reach: Vec<(Finding, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = parsed
            .machines
            .iter()
            .zip(&ids)
            .map(|(m, id)| {
                let opts = &opts;
                s.spawn(move || reach(host, m, id, opts))
            })
            .collect();
        handles
            .into_iter()
            .zip(&ids)
            .map(|(h, id)| {
                h.join().unwrap_or_else(|_| {
                    (Finding::new(id, Status::Fail, "the check panicked"), false)
                })
            })
            .collect()
    });
    let reachable: Vec<bool> = reach.iter().map(|(_, ok)| *ok).collect();
    out.extend(reach.into_iter().map(|(f, _)| f));
    after_reach(&mut out[0], &parsed.machines, &reachable, &ids, &local);

    if probe {
        // One after another: each is a whole nix-build, and parallel ones race to create a
        // fresh store's directories (Nix 2.8: "creating symlink ... File exists").
        let probes = parsed
            .machines
            .iter()
            .zip(&ids)
            .zip(&reachable)
            .map(|((m, id), ok)| probe_on(m, id, *ok, &local, store_root, conf, &opts));
        out.extend(probes);
    }
    out
}

fn files_note(parsed: &Machines) -> String {
    parsed
        .files
        .iter()
        .map(|(f, found)| {
            format!(
                "; {} {}",
                f.display(),
                if *found { "read" } else { "does not exist" }
            )
        })
        .collect()
}

/// `max-jobs` as Nix reads it (`auto`: the number of CPUs; default 1).
fn max_jobs(conf: &NixConf) -> u32 {
    match conf.get("max-jobs").map(|s| s.value.as_str()) {
        Some("auto") => std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        Some(v) => v.parse().unwrap_or(1),
        None => 1,
    }
}

/// Why a machine is not a candidate for a VM test here (None: it is one).
fn unfit(m: &Machine, system: &str) -> Option<String> {
    if !m.builds_system(system) {
        return Some(format!("builds {}, not {system}", m.systems.join(",")));
    }
    let lacks: Vec<&str> = VM_TEST_FEATURES
        .into_iter()
        .filter(|f| !m.supported_features.contains(*f) && !m.mandatory_features.contains(*f))
        .collect();
    if !lacks.is_empty() {
        return Some(format!("does not advertise {}", lacks.join(", ")));
    }
    let extra: Vec<&str> = m
        .mandatory_features
        .iter()
        .map(String::as_str)
        .filter(|f| !VM_TEST_FEATURES.contains(f))
        .collect();
    if !extra.is_empty() {
        return Some(format!(
            "mandatory features {} are not required by a VM test",
            extra.join(",")
        ));
    }
    None
}

/// `nix.builders`: the list, which builders take a VM test, and what Nix would do with one.
fn summary(parsed: &Machines, value: &str, source: &str, local: &Local, ids: &[String]) -> Finding {
    let id = "nix.builders";
    let listing: Vec<String> = parsed
        .machines
        .iter()
        .zip(ids)
        .map(|(m, id)| {
            let verdict = unfit(m, &local.system).unwrap_or_else(|| "takes VM tests".into());
            format!("{id} ({}, {}): {verdict}", m.uri, m.origin)
        })
        .collect();
    let detail = format!(
        "builders = {value} ({source}){}; {} builder(s): {}",
        files_note(parsed),
        parsed.machines.len(),
        listing.join("; ")
    );
    if !parsed.bad.is_empty() {
        let first = &parsed.bad[0];
        let bad: Vec<String> = parsed.bad.iter().map(ToString::to_string).collect();
        let what = if parsed.bad.iter().any(|b| b.fatal) {
            "Nix rejects the builders list (bad machine specification)"
        } else {
            "a machine line does not say what it seems to"
        };
        return Finding::new(
            id,
            Status::Fail,
            format!("{what}: {} ({})", first.origin, first.reason),
        )
        .detail(format!("{}; {detail}", bad.join("; ")))
        .fix(format!(
            "fix or remove {}: fields are URI SYSTEMS SSH-KEY MAX-JOBS SPEED-FACTOR SUPPORTED-FEATURES MANDATORY-FEATURES BASE64-HOST-KEY, `-` for an empty one; lists comma-separated without spaces",
            first.origin
        ));
    }
    let wanted = "{kvm, nixos-test}";
    match machines::plan(&parsed.machines, local) {
        Plan::Remote(order) => {
            let names: Vec<&str> = order.iter().map(|&i| ids[i].as_str()).collect();
            Finding::new(
                id,
                Status::Pass,
                format!(
                    "a VM test here is built on {} (builders advertising {wanted} for {})",
                    names.join(" or "),
                    local.system
                ),
            )
            .detail(detail)
        }
        Plan::Local => Finding::new(
            id,
            Status::Warn,
            format!("no builder advertises {wanted}: VM tests are built on this machine"),
        )
        .detail(format!(
            "{detail}; this machine has system-features {} and max-jobs {}",
            local.features.join(" "),
            local.max_jobs
        ))
        .fix("to build VM tests on a builder, add `kvm,nixos-test` to field 6 (supported features) of its machine line, once its build users can open /dev/kvm (check with `drydock doctor --nix-probe --builders`)"),
        Plan::Refuse(why) => Finding::new(
            id,
            Status::Fail,
            format!("Nix will refuse VM tests here: no builder advertises {wanted}"),
        )
        .detail(format!("{detail}; {why}"))
        .fix("add `kvm,nixos-test` to field 6 (supported features) of a builder's machine line whose build users can open /dev/kvm (check with `drydock doctor --nix-probe --builders`), or make this machine able to build them (see nix.system-features)"),
    }
}

/// `nix.builders` once the builders were tried: Nix 2.8 disables a builder it cannot connect to
/// ("cannot build on ...") and chooses again, so with every candidate unreachable it builds the
/// test here if it can, and otherwise says `unable to start any build; remote machines may not
/// have all required system features`.
fn after_reach(
    finding: &mut Finding,
    machines: &[Machine],
    reachable: &[bool],
    ids: &[String],
    local: &Local,
) {
    let Plan::Remote(order) = machines::plan(machines, local) else {
        return;
    };
    let down: Vec<&str> = order
        .iter()
        .filter(|&&i| !reachable[i])
        .map(|&i| ids[i].as_str())
        .collect();
    if down.is_empty() {
        return;
    }
    let up: Vec<Machine> = machines
        .iter()
        .zip(reachable)
        .filter(|(_, ok)| **ok)
        .map(|(m, _)| m.clone())
        .collect();
    let note = format!(
        "; unreachable, so skipped by Nix (`cannot build on ...`): {}",
        down.join(", ")
    );
    finding.detail.push_str(&note);
    match machines::plan(&up, local) {
        Plan::Remote(_) => {}
        Plan::Local => {
            finding.status = Status::Warn;
            finding.summary = format!(
                "every builder that takes VM tests is unreachable ({}): Nix builds them on this machine instead",
                down.join(", ")
            );
            finding.fix = Some(format!("see {}", down.join(", ")));
        }
        Plan::Refuse(why) => {
            finding.status = Status::Fail;
            finding.summary = format!(
                "every builder that takes VM tests is unreachable ({}): Nix will refuse VM tests here",
                down.join(", ")
            );
            finding.detail.push_str(&format!(
                "; Nix then says `unable to start any build; remote machines may not have all required system features`; {why}"
            ));
            finding.fix = Some(format!("see {}", down.join(", ")));
        }
    }
}

/// `builder.HOST`: reach the builder's store as Nix does; `true` when reachable.
fn reach(host: &Host, m: &Machine, id: &str, ssh_opts: &str) -> (Finding, bool) {
    let features = if m.supported_features.is_empty() && m.mandatory_features.is_empty() {
        "no features".to_string()
    } else {
        let mut all: Vec<&str> = m.supported_features.iter().map(String::as_str).collect();
        all.extend(m.mandatory_features.iter().map(|f| f.as_str()));
        format!("features {}", all.join(","))
    };
    let about = format!("{features}, max jobs {}", m.max_jobs);
    let line = format!("{} ({}): {}", m.uri, m.origin, m.describe());
    let Some(nix) = command::which("nix") else {
        return (
            Finding::new(id, Status::Fail, "not checked: nix not found on PATH")
                .detail(line)
                .fix("install Nix"),
            false,
        );
    };
    let mut cmd = std::process::Command::new(nix);
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "ping",
        "--store",
    ])
    .arg(m.store_uri())
    .env("NIX_SSHOPTS", ssh_opts);
    let how = format!(
        "`nix store ping --store {}` ({} on {}, NIX_SSHOPTS={ssh_opts:?})",
        m.store_uri(),
        remote_command(m.scheme()),
        m.ssh_target()
    );
    let r = match command::run_captured(cmd, PING_DEADLINE) {
        Ok(r) => r,
        Err(e) => {
            return (
                Finding::new(id, Status::Fail, format!("cannot run nix: {e}")).detail(line),
                false,
            );
        }
    };
    if r.code == Some(0) {
        // (Nix 2.8 prints it on stderr.)
        let version = r
            .stdout
            .lines()
            .chain(r.stderr.lines())
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| format!(", Nix {}", v.trim()))
            .unwrap_or_default();
        return (
            Finding::new(
                id,
                Status::Pass,
                format!(
                    "reachable over {} ({}{version}); {about}",
                    m.scheme(),
                    remote_command(m.scheme())
                ),
            )
            .detail(format!("{line}; checked with {how}")),
            true,
        );
    }
    let kind = classify(&r.stderr, r.timed_out);
    let target = m.ssh_target();
    let h = m.host();
    let key = m.ssh_key.as_deref();
    let key_missing = key.filter(|k| !host.exists(k));
    let (what, fix) = match kind {
        Unreachable::Dns => (
            format!("{h} does not resolve (DNS)"),
            format!(
                "correct the host name in {} or make it resolve (/etc/hosts, or a `Host {h}` block with `HostName` in the ssh config of the user who builds: root for a nix-daemon)",
                m.origin
            ),
        ),
        Unreachable::Refused => (
            format!("{h} refused the connection: no sshd listening on port 22"),
            format!(
                "start sshd on {h}, or name its port (Nix 2.8 store URIs have no port): `Port` in a `Host {h}` block of root's ~/.ssh/config, or NIX_SSHOPTS=\"-p PORT\""
            ),
        ),
        Unreachable::Timeout => (
            format!("{h} did not answer (timeout, or no route to it)"),
            format!(
                "check that {h} is up and that no firewall drops ssh (port 22) between this machine and it (doctor gives ssh -oConnectTimeout={CONNECT_TIMEOUT} unless NIX_SSHOPTS sets one)"
            ),
        ),
        Unreachable::Authentication => (
            format!("{target} refused the ssh key"),
            match (key, key_missing) {
                (_, Some(k)) => format!(
                    "the key file {k} (field 3 of {}) does not exist here: create it or name the right one",
                    m.origin
                ),
                (Some(k), None) => format!(
                    "authorize the key on the builder: `ssh-copy-id -i {k}.pub {target}` (or add {k}.pub to the remote user's ~/.ssh/authorized_keys)"
                ),
                (None, None) => format!(
                    "name a key in field 3 of {} (Nix otherwise uses the ssh defaults of the user who builds: root for a nix-daemon) and authorize it on {target}",
                    m.origin
                ),
            },
        ),
        Unreachable::HostKey => (
            format!("{h}'s host key is not known or does not match"),
            format!(
                "put the builder's host key in field 8 of {}: the output of `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub` on {h} (Nix writes it into a known_hosts file of its own); or add it to root's known_hosts (`ssh-keyscan {h}`, checked by hand)",
                m.origin
            ),
        ),
        Unreachable::NoNix => {
            let program = if m.scheme() == "ssh-ng" {
                "nix-daemon"
            } else {
                "nix-store"
            };
            (
                format!(
                    "{target} has no `{program}` on the PATH of its ssh sessions (no Nix on the remote?)"
                ),
                format!(
                    "install Nix on {h}, or make it found in a non-interactive ssh session (PATH for `ssh {target} {}`), or name it with the store parameter `?remote-program=/nix/var/nix/profiles/default/bin/{program}`",
                    remote_command(m.scheme())
                ),
            )
        }
        Unreachable::Other => (
            format!("{} could not be opened", m.uri),
            format!(
                "run `nix store ping --store '{}'` by hand (add `-v`) to see why",
                m.store_uri()
            ),
        ),
    };
    let label = match kind {
        Unreachable::Dns => "DNS",
        Unreachable::Refused => "refused",
        Unreachable::Timeout => "timeout",
        Unreachable::Authentication => "authentication",
        Unreachable::HostKey => "host key",
        Unreachable::NoNix => "no Nix on the remote",
        Unreachable::Other => "error",
    };
    (
        Finding::new(id, Status::Fail, format!("unreachable ({label}): {what}"))
            .detail(format!(
                "{line}; {how}{}: {}",
                if r.timed_out {
                    format!(" killed after {} s", PING_DEADLINE.as_secs())
                } else {
                    String::new()
                },
                last_lines(&r.stderr, 4).replace('\n', " | ")
            ))
            .fix(fix),
        false,
    )
}

/// `builder.HOST.probe`: the KVM probe build, sent to this builder only by Nix itself.
fn probe_on(
    m: &Machine,
    id: &str,
    reachable: bool,
    local: &Local,
    store_root: Option<&Path>,
    conf: &NixConf,
    ssh_opts: &str,
) -> Finding {
    let pid = format!("{id}.probe");
    if !reachable {
        return Finding::new(
            &pid,
            Status::Fail,
            "probe not run: the builder is unreachable",
        )
        .fix(format!("see {id}"));
    }
    if let Some(why) = unfit(m, &local.system) {
        return Finding::new(
            &pid,
            Status::Warn,
            format!("probe not run: {why}, so Nix never sends a VM test there"),
        )
        .fix(format!(
            "if its build users can open /dev/kvm, add `kvm,nixos-test` to field 6 of its line ({})",
            m.origin
        ));
    }
    let extra = vec![
        "--builders".to_string(),
        m.line(),
        "--max-jobs".to_string(),
        "0".to_string(),
    ];
    let env = [("NIX_SSHOPTS", ssh_opts.to_string())];
    let seen = match build_probe(store_root, conf, &VM_TEST_FEATURES, &extra, &env) {
        Ok(s) => s,
        Err(f) => {
            let detail = f.detail.replace('\n', " | ");
            if detail.contains("but I am a") {
                return Finding::new(
                    &pid,
                    Status::Fail,
                    "the builder's own Nix refused the probe: its system-features lack kvm or nixos-test",
                )
                .detail(detail)
                .fix(format!("on {}: `extra-system-features = kvm nixos-test` in its nix.conf (once its build users can open /dev/kvm), then restart its nix-daemon", m.host()));
            }
            if f.refused {
                return Finding::new(
                    &pid,
                    Status::Fail,
                    "Nix did not send the probe to the builder (it said no builder has the features, which Nix also says when it cannot connect)",
                )
                .detail(detail)
                .fix(format!("see {id}; with a nix-daemon, the daemon's root ssh reaches builders and an untrusted user's --builders is ignored"));
            }
            return Finding::new(&pid, Status::Fail, format!("on the builder: {}", f.summary))
                .detail(detail);
        }
    };
    let ids = &seen.ids;
    match seen.verdict.as_str() {
        "ok" => Finding::new(
            &pid,
            Status::Pass,
            format!("a Nix build on {} opened /dev/kvm in its sandbox", m.host()),
        )
        .detail(format!("builder credentials: {ids}; output {}", seen.out_path)),
        "denied" => Finding::new(
            &pid,
            Status::Fail,
            format!(
                "{} advertises kvm, but its build users cannot open /dev/kvm: VM tests die there with `Permission denied`",
                m.host()
            ),
        )
        .detail(format!(
            "builder credentials: {ids}; the sandbox has /dev/kvm, opening it failed: {}",
            seen.errno.as_deref().unwrap_or("(no message)")
        ))
        .fix(format!(
            "on {}: a udev rule `KERNEL==\"kvm\", MODE=\"0666\"` (then `udevadm trigger --name-match=kvm`), or `setfacl -m g:nixbld:rw /dev/kvm` for its build group; `drydock doctor` run there shows nix.build-users. Until then, remove kvm from field 6 of its line ({})",
            m.host(),
            m.origin
        )),
        "absent" => Finding::new(
            &pid,
            Status::Fail,
            format!("the sandbox on {} has no /dev/kvm", m.host()),
        )
        .detail(format!("builder credentials: {ids}"))
        .fix(format!(
            "on {}: load kvm (`modprobe kvm_intel` or `kvm_amd`) and check its `sandbox-paths`; or remove kvm from field 6 of its line ({})",
            m.host(),
            m.origin
        )),
        _ => Finding::new(&pid, Status::Fail, "the probe build produced no verdict")
            .detail(seen.report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_messages_name_the_cause() {
        let cases: &[(&str, bool, Unreachable)] = &[
            (
                "ssh: Could not resolve hostname b.invalid: Name or service not known\nerror: cannot open connection to remote store 'ssh-ng://b.invalid': error: unexpected end-of-file",
                false,
                Unreachable::Dns,
            ),
            (
                "ssh: connect to host 10.0.0.2 port 22: Connection refused",
                false,
                Unreachable::Refused,
            ),
            (
                "ssh: connect to host 10.0.0.2 port 22: Connection timed out",
                false,
                Unreachable::Timeout,
            ),
            (
                "ssh: connect to host 10.0.0.3 port 22: Network is unreachable",
                false,
                Unreachable::Timeout,
            ),
            ("", true, Unreachable::Timeout),
            (
                "root@10.0.0.2: Permission denied (publickey).",
                false,
                Unreachable::Authentication,
            ),
            (
                "Host key verification failed.\nerror: cannot open connection",
                false,
                Unreachable::HostKey,
            ),
            (
                "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@",
                false,
                Unreachable::HostKey,
            ),
            (
                "bash: line 1: nix-daemon: command not found",
                false,
                Unreachable::NoNix,
            ),
            ("sh: 1: nix-store: not found", false, Unreachable::NoNix),
            ("error: protocol mismatch", false, Unreachable::Other),
        ];
        for (stderr, timed_out, want) in cases {
            assert_eq!(classify(stderr, *timed_out), *want, "{stderr}");
        }
    }

    #[test]
    fn ids_are_unique_per_host() {
        let ms = machines::parse(
            "ssh://a; ssh-ng://root@a?remote-store=/x; ssh://b",
            "t",
            &|_| Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        )
        .machines;
        assert_eq!(ids(&ms), ["builder.a", "builder.a-2", "builder.b"]);
    }

    #[test]
    fn unreachable_builders_are_skipped_as_nix_skips_them() {
        let ms = machines::parse(
            "ssh://a x86_64-linux - 1 1 kvm,nixos-test\nssh://b x86_64-linux - 1 1 kvm,nixos-test",
            "t",
            &|_| Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        );
        let ids = ids(&ms.machines);
        let local = |features: &[&str], max_jobs| Local {
            system: "x86_64-linux".into(),
            features: features.iter().map(|s| s.to_string()).collect(),
            max_jobs,
        };
        let here = local(&["kvm", "nixos-test"], 1);
        let run = |reachable: &[bool], local: &Local| {
            let mut f = summary(&ms, "x", "t", local, &ids);
            after_reach(&mut f, &ms.machines, reachable, &ids, local);
            f
        };
        let f = run(&[true, false], &here);
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert!(
            f.detail
                .contains("skipped by Nix (`cannot build on ...`): builder.b"),
            "{f:?}"
        );
        let f = run(&[false, false], &here);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(
            f.summary.contains("builds them on this machine instead"),
            "{f:?}"
        );
        let f = run(&[false, false], &local(&["kvm", "nixos-test"], 0));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.detail.contains("unable to start any build"), "{f:?}");
        assert_eq!(f.fix.as_deref(), Some("see builder.a, builder.b"));
    }

    #[test]
    fn builders_summary_says_what_nix_does() {
        let ms = machines::parse(
            "ssh://good x86_64-linux - 1 2 kvm,nixos-test\nssh://plain x86_64-linux\nssh://bad - - x",
            "/etc/nix/machines",
            &|_| Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        );
        let local = Local {
            system: "x86_64-linux".into(),
            features: vec!["nixos-test".into()],
            max_jobs: 1,
        };
        let ids = ids(&ms.machines);
        let f = summary(&ms, "@/etc/nix/machines", "Nix's default", &local, &ids);
        assert_eq!(f.status, Status::Fail);
        assert!(f.summary.contains("/etc/nix/machines line 3"), "{f:?}");
        assert!(f.fix.unwrap().contains("/etc/nix/machines line 3"));
        let ok = Machines {
            bad: Vec::new(),
            ..ms.clone()
        };
        let f = summary(&ok, "@/etc/nix/machines", "Nix's default", &local, &ids);
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert!(f.summary.contains("built on builder.good"), "{f:?}");
        assert!(
            f.detail
                .contains("builder.plain (ssh://plain, /etc/nix/machines line 2): does not advertise kvm, nixos-test"),
            "{f:?}"
        );
        let none = Machines {
            machines: ms.machines[1..2].to_vec(),
            ..Machines::default()
        };
        let f = summary(&none, "ssh://plain", "NIX_CONFIG", &local, &ids[1..2]);
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.detail.contains("lacks kvm"), "{f:?}");
        let capable = Local {
            features: vec!["kvm".into(), "nixos-test".into()],
            ..local
        };
        let f = summary(&none, "ssh://plain", "NIX_CONFIG", &capable, &ids[1..2]);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(f.summary.contains("built on this machine"), "{f:?}");
    }
}
