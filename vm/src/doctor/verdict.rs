//! The verdict `doctor` prints before its findings: one answer per question a user has (can VMs
//! run here, and with what; can Nix build VM tests here, and where), and whether the doctor
//! exits 1. Decided from the findings alone (pure): the checks gather the facts, this module
//! only reads what they found.

use serde::Serialize;

use super::{Finding, Status};

/// What TCG costs, said wherever the verdict falls back to it.
const TCG_COST: &str = "expect boots and guest work roughly 5-20× slower than with KVM";

/// The KVM findings a launch needs to pass before it uses KVM, in the order they are reported.
const KVM_IDS: [&str; 7] = [
    "kvm.modules",
    "kvm.device",
    "kvm.access",
    "kvm.cgroup",
    "kvm.api",
    "kvm.create_vm",
    "kvm.exec",
];

/// What the user asked the doctor to try for real.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asked {
    /// `--nix-probe`: a build on this machine that opens `/dev/kvm` inside the sandbox.
    pub nix_probe: bool,
    /// `--builders`: the same build on each remote builder that takes VM tests.
    pub builders: bool,
}

/// An answer to one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Yes,
    /// On some of the places Nix may choose, not on others.
    Partly,
    No,
}

/// "Can VMs run here?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmsAnswer {
    pub question: &'static str,
    pub answer: Answer,
    /// `kvm` or `tcg`; `None` when VMs cannot run.
    pub accel: Option<&'static str>,
    /// The answer as one line (after the question).
    pub text: String,
    /// The findings the answer rests on.
    pub because: Vec<String>,
}

/// "Can Nix build VM tests here?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NixAnswer {
    pub question: &'static str,
    pub answer: Answer,
    /// Where Nix builds a VM test: `local` (this machine) or `remote` (its builders); `None`
    /// when it builds none (no Nix, or it refuses them).
    pub on: Option<&'static str>,
    /// A probe build the user asked for decided the answer (else it comes from the settings).
    pub probed: bool,
    /// Each remote builder the probe was built on, and its answer.
    pub builders: Vec<BuilderAnswer>,
    /// The answer as one line (after the question).
    pub text: String,
    /// The findings the answer rests on.
    pub because: Vec<String>,
    /// When not probed: the command that would try it.
    pub check: Option<&'static str>,
}

/// One remote builder's probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuilderAnswer {
    /// `builder.HOST`.
    pub id: String,
    pub answer: Answer,
}

/// The answers, and the exit code they give.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub vms: VmsAnswer,
    pub nix: NixAnswer,
    /// The doctor exits 1: VMs cannot run here at all, or the answer to something the user
    /// asked to try (`--nix-probe`, `--builders`, `--boot-probe`) is not yes.
    pub failed: bool,
}

fn find<'a>(findings: &'a [Finding], id: &str) -> Option<&'a Finding> {
    findings.iter().find(|f| f.id == id)
}

fn not_passed<'a>(findings: &'a [Finding], id: &str) -> Option<&'a Finding> {
    find(findings, id).filter(|f| f.status != Status::Pass)
}

fn is_builder_probe(id: &str) -> bool {
    id.starts_with("builder.") && id.ends_with(".probe")
}

/// Why a launch should not use KVM: the first KVM finding that did not pass (a check that did
/// not run counts through the one that stopped it). `None`: every KVM check passed, the
/// guest-execution probe included, with no PVM-only module.
pub(crate) fn kvm_blocker(findings: &[Finding]) -> Option<Finding> {
    for id in KVM_IDS {
        match find(findings, id) {
            Some(f) if f.status == Status::Pass => {}
            Some(f) => return Some(f.clone()),
            None => {
                let why = findings
                    .iter()
                    .filter(|f| f.id == "cpu.virt" || f.id.starts_with("kvm."))
                    .find(|f| f.status != Status::Pass);
                return Some(why.cloned().unwrap_or_else(|| {
                    Finding::new(id, Status::Fail, format!("{id} did not run"))
                }));
            }
        }
    }
    None
}

/// Why KVM here cannot run a standard kernel, whoever opens `/dev/kvm` (Nix's build users
/// included): no module or a PVM-only one, no device, a failed boot probe, or, where this
/// process opened the device, a failing API version, VM creation or guest run.
fn kernel_blocker(findings: &[Finding]) -> Option<&Finding> {
    let opened = find(findings, "kvm.create_vm").is_some();
    ["kvm.modules", "kvm.device", "kvm.boot"]
        .into_iter()
        .chain(
            ["kvm.api", "kvm.create_vm", "kvm.exec"]
                .into_iter()
                .filter(|_| opened),
        )
        .find_map(|id| not_passed(findings, id))
}

fn vms(findings: &[Finding]) -> VmsAnswer {
    let answer = |answer, accel, text: String, because: Vec<&str>| VmsAnswer {
        question: "Can VMs run here?",
        answer,
        accel,
        text,
        because: because.into_iter().map(str::to_string).collect(),
    };
    if let Some(q) = find(findings, "qemu").filter(|f| f.status == Status::Fail) {
        return answer(
            Answer::No,
            None,
            format!("no: {} [qemu]", q.summary),
            vec!["qemu"],
        );
    }
    let boot = find(findings, "kvm.boot").filter(|f| f.status == Status::Fail);
    let Some(blocker) = kvm_blocker(findings).or_else(|| boot.cloned()) else {
        return answer(Answer::Yes, Some("kvm"), "yes, with KVM".into(), Vec::new());
    };
    if let Some(tcg) = find(findings, "qemu.tcg") {
        return answer(
            Answer::No,
            None,
            format!(
                "no: {} [qemu.tcg], and no usable KVM: {} [{}]",
                tcg.summary, blocker.summary, blocker.id
            ),
            vec!["qemu.tcg", &blocker.id],
        );
    }
    let how = if blocker.id == "kvm.boot" {
        // Every other KVM check passed, so `--accel auto` would still choose KVM.
        "yes, with `--accel tcg` (KVM here does not boot a kernel"
    } else {
        "yes, with TCG (no usable KVM"
    };
    answer(
        Answer::Yes,
        Some("tcg"),
        format!("{how}: {} [{}]); {TCG_COST}", blocker.summary, blocker.id),
        vec![&blocker.id],
    )
}

/// `; also ID, ID` for the reasons after the first.
fn also(ids: &[&str]) -> String {
    if ids.len() <= 1 {
        String::new()
    } else {
        format!("; also {}", ids[1..].join(", "))
    }
}

fn nix(findings: &[Finding], asked: Asked) -> NixAnswer {
    let base = NixAnswer {
        question: "Can Nix build VM tests here?",
        answer: Answer::No,
        on: None,
        probed: false,
        builders: Vec::new(),
        text: String::new(),
        because: Vec::new(),
        check: None,
    };
    if let Some(f) = find(findings, "nix") {
        return NixAnswer {
            text: format!("no: {} [nix]", f.summary),
            because: vec!["nix".into()],
            ..base
        };
    }
    match find(findings, "nix.builders") {
        Some(b) if b.status == Status::Fail => NixAnswer {
            text: format!("no: {} [nix.builders]", b.summary),
            because: vec!["nix.builders".into()],
            ..base
        },
        Some(b) if b.status == Status::Pass => remote(findings, b, base),
        _ => local(findings, asked, base),
    }
}

/// Nix sends VM tests to remote builders (`nix.builders` passed).
fn remote(findings: &[Finding], list: &Finding, base: NixAnswer) -> NixAnswer {
    // Builders that do not take VM tests get a `warn` probe ("probe not run"): not places Nix
    // sends a VM test to.
    let probes: Vec<&Finding> = findings
        .iter()
        .filter(|f| is_builder_probe(&f.id) && f.status != Status::Warn)
        .collect();
    let base = NixAnswer {
        on: Some("remote"),
        ..base
    };
    if probes.is_empty() {
        let check = "drydock doctor --nix-probe --builders";
        return NixAnswer {
            answer: Answer::Yes,
            text: format!(
                "probably: {} [nix.builders]; from the settings, not probed (`{check}` builds one on each)",
                list.summary
            ),
            because: vec!["nix.builders".into()],
            check: Some(check),
            ..base
        };
    }
    let builder = |p: &Finding| p.id.trim_end_matches(".probe").to_string();
    let ok: Vec<String> = probes
        .iter()
        .filter(|p| p.status == Status::Pass)
        .map(|p| builder(p))
        .collect();
    let bad: Vec<&Finding> = probes
        .iter()
        .copied()
        .filter(|p| p.status != Status::Pass)
        .collect();
    let builders = probes
        .iter()
        .map(|p| BuilderAnswer {
            id: builder(p),
            answer: if p.status == Status::Pass {
                Answer::Yes
            } else {
                Answer::No
            },
        })
        .collect();
    let because = probes.iter().map(|p| p.id.clone()).collect();
    let bad_ids: Vec<&str> = bad.iter().map(|p| p.id.as_str()).collect();
    let (answer, text) = match (ok.is_empty(), bad.first()) {
        (_, None) => (
            Answer::Yes,
            format!(
                "yes, on {} (a probe build opened /dev/kvm in the sandbox of each)",
                ok.join(", ")
            ),
        ),
        (true, Some(first)) => (
            Answer::No,
            format!("no: {} [{}]{}", first.summary, first.id, also(&bad_ids)),
        ),
        (false, Some(first)) => (
            Answer::Partly,
            format!(
                "only on {}, and Nix may send a VM test to any builder that takes them: {} [{}]{}",
                ok.join(", "),
                first.summary,
                first.id,
                also(&bad_ids)
            ),
        ),
    };
    NixAnswer {
        answer,
        probed: true,
        builders,
        text,
        because,
        ..base
    }
}

/// Nix builds VM tests on this machine (no remote builder takes them).
fn local(findings: &[Finding], asked: Asked, base: NixAnswer) -> NixAnswer {
    let probe = find(findings, "nix.probe").filter(|_| asked.nix_probe);
    let mut reasons: Vec<(String, &str)> = Vec::new();
    if let Some(p) = probe.filter(|p| p.status != Status::Pass) {
        reasons.push((p.summary.clone(), &p.id));
    }
    if let Some(k) = kernel_blocker(findings) {
        reasons.push((
            format!("KVM here cannot run a VM test's kernel: {}", k.summary),
            &k.id,
        ));
    }
    if let Some(f) = not_passed(findings, "nix.system-features") {
        reasons.push((f.summary.clone(), &f.id));
    }
    // A probe that ran says more than the settings about the build users' access.
    if probe.is_none() {
        if let Some(f) = not_passed(findings, "nix.build-users") {
            reasons.push((f.summary.clone(), &f.id));
        }
    }
    let probed = probe.is_some();
    let check = "drydock doctor --nix-probe";
    let unprobed = if probed {
        String::new()
    } else {
        format!("; from the settings, not probed (`{check}` tries a build)")
    };
    let base = NixAnswer {
        on: Some("local"),
        probed,
        check: (!probed).then_some(check),
        because: reasons.iter().map(|(_, id)| id.to_string()).collect(),
        ..base
    };
    let Some((first, id)) = reasons.first() else {
        let text = if probed {
            "yes, on this machine: a probe build opened /dev/kvm in the sandbox [nix.probe]".into()
        } else {
            format!("probably, on this machine: its settings allow it{unprobed}")
        };
        return NixAnswer {
            answer: Answer::Yes,
            because: if probed {
                vec!["nix.probe".into()]
            } else {
                Vec::new()
            },
            text,
            ..base
        };
    };
    let ids: Vec<&str> = reasons.iter().map(|(_, id)| *id).collect();
    NixAnswer {
        answer: Answer::No,
        text: format!("no: {first} [{id}]{}{unprobed}", also(&ids)),
        ..base
    }
}

/// The verdict on `findings`, for a doctor run that was asked `asked`.
pub fn verdict(findings: &[Finding], asked: Asked) -> Verdict {
    let vms = vms(findings);
    let nix = nix(findings, asked);
    let probe_failed = findings.iter().any(|f| {
        f.status == Status::Fail
            && (f.id == "nix.probe" || f.id == "kvm.boot" || is_builder_probe(&f.id))
    });
    let failed =
        vms.answer == Answer::No || (nix.probed && nix.answer != Answer::Yes) || probe_failed;
    Verdict { vms, nix, failed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(id: &str, status: Status, summary: &str) -> Finding {
        Finding::new(id, status, summary)
    }

    use Status::{Fail, Pass, Warn};

    const PVM: &str =
        "kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM";
    const BUILD_USERS: &str = "Nix build users cannot open /dev/kvm: manual runs work, but `nix build` of a VM test will not";

    /// KVM that works, QEMU, and Nix settings that allow VM tests.
    fn good() -> Vec<Finding> {
        vec![
            f("cpu.virt", Pass, "CPU has Intel VT-x (vmx)"),
            f("kvm.modules", Pass, "KVM modules loaded: kvm, kvm_intel"),
            f("kvm.device", Pass, "/dev/kvm is character device 10:232"),
            f("kvm.access", Pass, "alice can open /dev/kvm read-write"),
            f("kvm.cgroup", Pass, "cgroup v2"),
            f("kvm.api", Pass, "KVM API version 12"),
            f("kvm.create_vm", Pass, "KVM_CREATE_VM works"),
            f("kvm.exec", Pass, "a real-mode guest ran to HLT in 40 µs"),
            f(
                "nix.system-features",
                Pass,
                "system-features include kvm and nixos-test",
            ),
            f("nix.sandbox", Pass, "sandbox = true"),
            f("nix.build-users", Pass, "Nix build users can open /dev/kvm"),
            f("cgroup.placement", Pass, "cgroup v2: ok"),
            f("qemu", Pass, "QEMU emulator version 7.2"),
        ]
    }

    /// `good()` with these findings replaced (same id) or added.
    fn with(changes: &[Finding]) -> Vec<Finding> {
        let mut out = good();
        for c in changes {
            match out.iter_mut().find(|f| f.id == c.id) {
                Some(f) => *f = c.clone(),
                None => out.push(c.clone()),
            }
        }
        out
    }

    fn without(mut fs: Vec<Finding>, ids: &[&str]) -> Vec<Finding> {
        fs.retain(|f| !ids.contains(&f.id.as_str()));
        fs
    }

    /// The PVM host as root: the device opens, the real-mode probe runs, the build users
    /// cannot open the root-only device.
    fn pvm_root() -> Vec<Finding> {
        with(&[
            f(
                "cpu.virt",
                Warn,
                "no VT-x/AMD-V exposed; KVM here is paravirtual (kvm_pvm)",
            ),
            f("kvm.modules", Warn, PVM),
            f("kvm.exec", Warn, "a real-mode guest ran to HLT in 3435 µs"),
            f("nix.build-users", Warn, BUILD_USERS),
        ])
    }

    /// The PVM host as an ordinary user: the device does not open, so no API probes.
    fn pvm_user() -> Vec<Finding> {
        without(
            with(&[
                f(
                    "cpu.virt",
                    Warn,
                    "no VT-x/AMD-V exposed; KVM here is paravirtual (kvm_pvm)",
                ),
                f("kvm.modules", Warn, PVM),
                f(
                    "kvm.access",
                    Fail,
                    "bob cannot open /dev/kvm: Permission denied (os error 13)",
                ),
                f(
                    "kvm.api",
                    Warn,
                    "KVM API not probed: /dev/kvm could not be opened",
                ),
                f(
                    "nix.system-features",
                    Warn,
                    "system-features lack kvm: Nix will refuse to build VM tests here",
                ),
                f(
                    "nix.build-users",
                    Warn,
                    "builds run as you, and you cannot open /dev/kvm",
                ),
                f(
                    "cgroup.placement",
                    Warn,
                    "drydock cannot create a VM cgroup",
                ),
            ]),
            &["kvm.create_vm", "kvm.exec"],
        )
    }

    struct Case {
        what: &'static str,
        findings: Vec<Finding>,
        asked: Asked,
        vms: (Answer, Option<&'static str>, &'static str),
        nix: (Answer, Option<&'static str>, bool, &'static str),
        failed: bool,
    }

    const NOTHING: Asked = Asked {
        nix_probe: false,
        builders: false,
    };
    const PROBE: Asked = Asked {
        nix_probe: true,
        builders: false,
    };
    const BUILDERS: Asked = Asked {
        nix_probe: true,
        builders: true,
    };

    #[test]
    fn answers_and_exit_codes() {
        use Answer::{No, Partly, Yes};
        let cases = vec![
            Case {
                what: "everything works, nothing probed",
                findings: good(),
                asked: NOTHING,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Yes,
                    Some("local"),
                    false,
                    "probably, on this machine: its settings allow it; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: false,
            },
            Case {
                what: "everything works, probed",
                findings: with(&[f(
                    "nix.probe",
                    Pass,
                    "a Nix build opened /dev/kvm inside the sandbox",
                )]),
                asked: PROBE,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Yes,
                    Some("local"),
                    true,
                    "yes, on this machine: a probe build opened /dev/kvm in the sandbox [nix.probe]",
                ),
                failed: false,
            },
            Case {
                what: "PVM host as root: TCG; Nix's VM tests would hang, and its build users are refused",
                findings: pvm_root(),
                asked: NOTHING,
                vms: (
                    Yes,
                    Some("tcg"),
                    "yes, with TCG (no usable KVM: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]); expect boots and guest work roughly 5-20× slower than with KVM",
                ),
                nix: (
                    No,
                    Some("local"),
                    false,
                    "no: KVM here cannot run a VM test's kernel: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]; also nix.build-users; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: false,
            },
            Case {
                what: "PVM host as root, probed: the asked probe fails, exit 1",
                findings: with(&[
                    f("kvm.modules", Warn, PVM),
                    f("kvm.exec", Warn, "a real-mode guest ran to HLT in 3435 µs"),
                    f("nix.build-users", Warn, BUILD_USERS),
                    f(
                        "nix.probe",
                        Fail,
                        "inside the Nix sandbox, the builder cannot open /dev/kvm",
                    ),
                ]),
                asked: PROBE,
                vms: (
                    Yes,
                    Some("tcg"),
                    "yes, with TCG (no usable KVM: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]); expect boots and guest work roughly 5-20× slower than with KVM",
                ),
                nix: (
                    No,
                    Some("local"),
                    true,
                    "no: inside the Nix sandbox, the builder cannot open /dev/kvm [nix.probe]; also kvm.modules",
                ),
                failed: true,
            },
            Case {
                what: "PVM host, probe passes: the sandbox opens /dev/kvm, but the kernel would hang",
                findings: with(&[
                    f("kvm.modules", Warn, PVM),
                    f(
                        "nix.probe",
                        Pass,
                        "a Nix build opened /dev/kvm inside the sandbox",
                    ),
                ]),
                asked: PROBE,
                vms: (
                    Yes,
                    Some("tcg"),
                    "yes, with TCG (no usable KVM: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]); expect boots and guest work roughly 5-20× slower than with KVM",
                ),
                nix: (
                    No,
                    Some("local"),
                    true,
                    "no: KVM here cannot run a VM test's kernel: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]",
                ),
                failed: true,
            },
            Case {
                what: "PVM host as an ordinary user: warnings, exit 0",
                findings: pvm_user(),
                asked: NOTHING,
                vms: (
                    Yes,
                    Some("tcg"),
                    "yes, with TCG (no usable KVM: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]); expect boots and guest work roughly 5-20× slower than with KVM",
                ),
                nix: (
                    No,
                    Some("local"),
                    false,
                    "no: KVM here cannot run a VM test's kernel: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]; also nix.system-features, nix.build-users; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: false,
            },
            Case {
                what: "a user not in the kvm group on a good host: TCG, and Nix's builders are fine",
                findings: without(
                    with(&[
                        f(
                            "kvm.access",
                            Fail,
                            "bob cannot open /dev/kvm: Permission denied (os error 13)",
                        ),
                        f(
                            "kvm.api",
                            Warn,
                            "KVM API not probed: /dev/kvm could not be opened",
                        ),
                    ]),
                    &["kvm.create_vm", "kvm.exec"],
                ),
                asked: NOTHING,
                vms: (
                    Yes,
                    Some("tcg"),
                    "yes, with TCG (no usable KVM: bob cannot open /dev/kvm: Permission denied (os error 13) [kvm.access]); expect boots and guest work roughly 5-20× slower than with KVM",
                ),
                nix: (
                    Yes,
                    Some("local"),
                    false,
                    "probably, on this machine: its settings allow it; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: false,
            },
            Case {
                what: "no QEMU: VMs cannot run, exit 1",
                findings: with(&[f("qemu", Fail, "qemu-system-x86_64 not found on PATH")]),
                asked: NOTHING,
                vms: (No, None, "no: qemu-system-x86_64 not found on PATH [qemu]"),
                nix: (
                    Yes,
                    Some("local"),
                    false,
                    "probably, on this machine: its settings allow it; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: true,
            },
            Case {
                what: "no usable KVM and a QEMU without TCG: VMs cannot run, exit 1",
                findings: with(&[
                    f("kvm.device", Fail, "/dev/kvm does not exist"),
                    f(
                        "qemu.tcg",
                        Warn,
                        "QEMU has no TCG: VMs run here only with KVM",
                    ),
                ]),
                asked: NOTHING,
                vms: (
                    No,
                    None,
                    "no: QEMU has no TCG: VMs run here only with KVM [qemu.tcg], and no usable KVM: /dev/kvm does not exist [kvm.device]",
                ),
                nix: (
                    No,
                    Some("local"),
                    false,
                    "no: KVM here cannot run a VM test's kernel: /dev/kvm does not exist [kvm.device]; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: true,
            },
            Case {
                what: "a QEMU without TCG on a KVM host: VMs run with KVM",
                findings: with(&[f(
                    "qemu.tcg",
                    Warn,
                    "QEMU has no TCG: VMs run here only with KVM",
                )]),
                asked: NOTHING,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Yes,
                    Some("local"),
                    false,
                    "probably, on this machine: its settings allow it; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: false,
            },
            Case {
                what: "a boot probe that hangs where every other KVM check passed",
                findings: with(&[f(
                    "kvm.boot",
                    Fail,
                    "the kernel hung under KVM: no console output in 20 s",
                )]),
                asked: NOTHING,
                vms: (
                    Yes,
                    Some("tcg"),
                    "yes, with `--accel tcg` (KVM here does not boot a kernel: the kernel hung under KVM: no console output in 20 s [kvm.boot]); expect boots and guest work roughly 5-20× slower than with KVM",
                ),
                nix: (
                    No,
                    Some("local"),
                    false,
                    "no: KVM here cannot run a VM test's kernel: the kernel hung under KVM: no console output in 20 s [kvm.boot]; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: true,
            },
            Case {
                what: "Nix is not installed",
                findings: with(&[f("nix", Warn, "Nix not found: Nix settings not checked")]),
                asked: NOTHING,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    No,
                    None,
                    false,
                    "no: Nix not found: Nix settings not checked [nix]",
                ),
                failed: false,
            },
            Case {
                what: "remote builders take VM tests, not probed",
                findings: with(&[
                    f(
                        "nix.builders",
                        Pass,
                        "a VM test here is built on builder.a or builder.b (builders advertising {kvm, nixos-test} for x86_64-linux)",
                    ),
                    f("builder.a", Pass, "reachable over ssh-ng"),
                    f("builder.b", Pass, "reachable over ssh"),
                ]),
                asked: NOTHING,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Yes,
                    Some("remote"),
                    false,
                    "probably: a VM test here is built on builder.a or builder.b (builders advertising {kvm, nixos-test} for x86_64-linux) [nix.builders]; from the settings, not probed (`drydock doctor --nix-probe --builders` builds one on each)",
                ),
                failed: false,
            },
            Case {
                what: "remote builders probed: one opens /dev/kvm, one refuses, one takes no VM tests",
                findings: with(&[
                    f(
                        "nix.builders",
                        Pass,
                        "a VM test here is built on builder.a or builder.b",
                    ),
                    f(
                        "builder.a.probe",
                        Pass,
                        "a Nix build on a opened /dev/kvm in its sandbox",
                    ),
                    f(
                        "builder.b.probe",
                        Fail,
                        "b advertises kvm, but its build users cannot open /dev/kvm: VM tests die there with `Permission denied`",
                    ),
                    f(
                        "builder.c.probe",
                        Warn,
                        "probe not run: does not advertise kvm, so Nix never sends a VM test there",
                    ),
                    f(
                        "nix.probe",
                        Pass,
                        "a Nix build opened /dev/kvm inside the sandbox",
                    ),
                ]),
                asked: BUILDERS,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Partly,
                    Some("remote"),
                    true,
                    "only on builder.a, and Nix may send a VM test to any builder that takes them: b advertises kvm, but its build users cannot open /dev/kvm: VM tests die there with `Permission denied` [builder.b.probe]",
                ),
                failed: true,
            },
            Case {
                what: "remote builders probed, all good",
                findings: with(&[
                    f(
                        "nix.builders",
                        Pass,
                        "a VM test here is built on builder.a or builder.b",
                    ),
                    f(
                        "builder.a.probe",
                        Pass,
                        "a Nix build on a opened /dev/kvm in its sandbox",
                    ),
                    f(
                        "builder.b.probe",
                        Pass,
                        "a Nix build on b opened /dev/kvm in its sandbox",
                    ),
                    f(
                        "nix.probe",
                        Pass,
                        "a Nix build opened /dev/kvm inside the sandbox",
                    ),
                ]),
                asked: BUILDERS,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Yes,
                    Some("remote"),
                    true,
                    "yes, on builder.a, builder.b (a probe build opened /dev/kvm in the sandbox of each)",
                ),
                failed: false,
            },
            Case {
                what: "remote builders probed, none reachable",
                findings: with(&[
                    f(
                        "nix.builders",
                        Pass,
                        "a VM test here is built on builder.a or builder.b",
                    ),
                    f(
                        "builder.a.probe",
                        Fail,
                        "probe not run: the builder is unreachable",
                    ),
                    f(
                        "builder.b.probe",
                        Fail,
                        "probe not run: the builder is unreachable",
                    ),
                    f(
                        "nix.probe",
                        Pass,
                        "a Nix build opened /dev/kvm inside the sandbox",
                    ),
                ]),
                asked: BUILDERS,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    No,
                    Some("remote"),
                    true,
                    "no: probe not run: the builder is unreachable [builder.a.probe]; also builder.b.probe",
                ),
                failed: true,
            },
            Case {
                what: "a builders list Nix rejects: no, from the settings, exit 0",
                findings: with(&[f(
                    "nix.builders",
                    Fail,
                    "Nix rejects the builders list (bad machine specification): /etc/nix/machines line 3 (max jobs)",
                )]),
                asked: NOTHING,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    No,
                    None,
                    false,
                    "no: Nix rejects the builders list (bad machine specification): /etc/nix/machines line 3 (max jobs) [nix.builders]",
                ),
                failed: false,
            },
            Case {
                what: "no builder takes VM tests: they are built here",
                findings: with(&[f(
                    "nix.builders",
                    Warn,
                    "no builder advertises {kvm, nixos-test}: VM tests are built on this machine",
                )]),
                asked: NOTHING,
                vms: (Yes, Some("kvm"), "yes, with KVM"),
                nix: (
                    Yes,
                    Some("local"),
                    false,
                    "probably, on this machine: its settings allow it; from the settings, not probed (`drydock doctor --nix-probe` tries a build)",
                ),
                failed: false,
            },
        ];
        for c in cases {
            let v = verdict(&c.findings, c.asked);
            assert_eq!(
                (v.vms.answer, v.vms.accel, v.vms.text.as_str()),
                c.vms,
                "{}: vms",
                c.what
            );
            assert_eq!(
                (v.nix.answer, v.nix.on, v.nix.probed, v.nix.text.as_str()),
                c.nix,
                "{}: nix",
                c.what
            );
            assert_eq!(v.failed, c.failed, "{}: failed", c.what);
            // Every finding the answers rest on is one of the findings.
            for id in v.vms.because.iter().chain(&v.nix.because) {
                assert!(c.findings.iter().any(|f| &f.id == id), "{}: {id}", c.what);
            }
            assert_eq!(
                v.nix.check.is_some(),
                !v.nix.probed && v.nix.on.is_some(),
                "{}",
                c.what
            );
        }
    }

    #[test]
    fn builder_answers_name_the_builders() {
        let v = verdict(
            &with(&[
                f("nix.builders", Pass, "a VM test here is built on builder.a"),
                f("builder.a.probe", Pass, "ok"),
                f("builder.a-2.probe", Fail, "refused"),
            ]),
            BUILDERS,
        );
        assert_eq!(
            v.nix.builders,
            [
                BuilderAnswer {
                    id: "builder.a".into(),
                    answer: Answer::Yes
                },
                BuilderAnswer {
                    id: "builder.a-2".into(),
                    answer: Answer::No
                }
            ]
        );
    }

    #[test]
    fn kvm_blocker_is_the_first_kvm_finding_that_did_not_pass() {
        assert_eq!(kvm_blocker(&good()), None);
        assert_eq!(kvm_blocker(&pvm_root()).unwrap().id, "kvm.modules");
        let access = without(
            with(&[
                f("kvm.access", Fail, "denied"),
                f("kvm.api", Warn, "not probed"),
            ]),
            &["kvm.create_vm", "kvm.exec"],
        );
        assert_eq!(kvm_blocker(&access).unwrap().id, "kvm.access");
        // A probe that did not run: the check that stopped it, or the probe's own id.
        let gone = without(good(), &["kvm.exec"]);
        assert_eq!(kvm_blocker(&gone).unwrap().id, "kvm.exec");
        let stopped = without(with(&[f("cpu.virt", Fail, "no vmx")]), &["kvm.exec"]);
        assert_eq!(kvm_blocker(&stopped).unwrap().id, "cpu.virt");
    }

    #[test]
    fn serializes_with_the_documented_fields() {
        let v = verdict(&pvm_root(), NOTHING);
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["vms"]["answer"], "yes");
        assert_eq!(j["vms"]["accel"], "tcg");
        assert_eq!(j["vms"]["question"], "Can VMs run here?");
        assert_eq!(j["vms"]["because"][0], "kvm.modules");
        assert_eq!(j["nix"]["answer"], "no");
        assert_eq!(j["nix"]["on"], "local");
        assert_eq!(j["nix"]["probed"], false);
        assert_eq!(j["nix"]["check"], "drydock doctor --nix-probe");
        assert!(j["nix"]["builders"].as_array().unwrap().is_empty());
        assert_eq!(j["failed"], false);
    }
}
