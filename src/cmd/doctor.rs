//! `drydock doctor`: run the preflight checks; print the verdict (one line per question a user
//! has), then the findings as a table, then the fixes; or all of it as one JSON document. Exit 1
//! when VMs cannot run here, or when something the user asked to try (a probe) says no.

use std::io::{IsTerminal, Write};

use std::path::PathBuf;

use drydock_gc::NixConfSources;
use drydock_vm::{Asked, BootProbe, DoctorOptions, Finding, Host, Status, Verdict};

use crate::cli::DoctorArgs;
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

/// What `doctor` prints: the JSON document, and what the text is made of.
#[derive(Debug, serde::Serialize)]
struct DoctorReport {
    verdict: Verdict,
    checks: Vec<Finding>,
}

pub fn run(ctx: &Context, args: &DoctorArgs) -> anyhow::Result<Outcome> {
    let opts = DoctorOptions {
        store_dir: ctx.store_dir.clone(),
        state_dir: ctx.state_dir.clone(),
        store_root: ctx.store_root.clone(),
        nix_conf: NixConfSources::from_env(),
        nix_probe: args.nix_probe,
        builder_probe: args.builders,
        qemu: drydock_vm::configured_qemu(None),
        boot_probe: if args.boot_probe {
            Some(boot_probe(args)?)
        } else {
            None
        },
    };
    let root = std::env::var_os("DRYDOCK_HOST_ROOT").map(std::path::PathBuf::from);
    let host = root.map(Host::at).unwrap_or_else(Host::system);
    let checks = drydock_vm::run_checks(&host, &opts)?;
    let asked = Asked {
        nix_probe: args.nix_probe,
        builders: args.nix_probe && args.builders,
    };
    let report = DoctorReport {
        verdict: drydock_vm::verdict(&checks, asked),
        checks,
    };
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, &report)?;
    } else {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        render(&mut out, &report, colour)?;
    }
    Ok(if report.verdict.failed {
        Outcome::Failed
    } else {
        Outcome::Success
    })
}

/// The kernel to boot for `--boot-probe`: named, or the test guest's from the set-up cache.
fn boot_probe(args: &DoctorArgs) -> anyhow::Result<BootProbe> {
    let cache = std::env::var_os("DRYDOCK_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("drydock")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/drydock")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
        .join("guest");
    let kernel = args
        .probe_kernel
        .clone()
        .unwrap_or_else(|| cache.join("kernel/vmlinuz"));
    if !kernel.is_file() {
        return Err(bad_input(format!(
            "--boot-probe: no kernel at {} (run scripts/setup, or name one with --probe-kernel)",
            kernel.display()
        )));
    }
    let initrd = match &args.probe_initrd {
        Some(i) if !i.is_file() => {
            return Err(bad_input(format!(
                "--probe-initrd {}: no such file",
                i.display()
            )));
        }
        Some(i) => Some(i.clone()),
        None => Some(cache.join("initrd")).filter(|i| args.probe_kernel.is_none() && i.is_file()),
    };
    let qemu =
        drydock_vm::configured_qemu(None).unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    Ok(BootProbe {
        qemu,
        kernel,
        initrd,
        deadline: std::time::Duration::from_secs(args.probe_timeout.max(1)),
    })
}

/// The verdict's lines, the questions padded to one width.
fn render_verdict(out: &mut impl Write, v: &Verdict) -> std::io::Result<()> {
    let lines = [
        (v.vms.question, v.vms.text.as_str()),
        (v.nix.question, v.nix.text.as_str()),
    ];
    let width = lines
        .iter()
        .map(|(q, _)| q.chars().count())
        .max()
        .unwrap_or(0);
    for (q, a) in lines {
        writeln!(out, "{q:width$} {a}")?;
    }
    writeln!(out)
}

fn render(out: &mut impl Write, report: &DoctorReport, colour: bool) -> std::io::Result<()> {
    render_verdict(out, &report.verdict)?;
    let findings = &report.checks;
    let width = findings.iter().map(|f| f.id.len()).max().unwrap_or(0);
    let mark = |s: Status| match (s, colour) {
        (Status::Pass, false) => "✔",
        (Status::Warn, false) => "!",
        (Status::Fail, false) => "✘",
        (Status::Pass, true) => "\x1b[32m✔\x1b[0m",
        (Status::Warn, true) => "\x1b[33m!\x1b[0m",
        (Status::Fail, true) => "\x1b[31m✘\x1b[0m",
    };
    for f in findings {
        writeln!(out, "{} {:width$}  {}", mark(f.status), f.id, f.summary)?;
        if f.status != Status::Pass && !f.detail.is_empty() {
            writeln!(out, "  {:width$}  {}", "", f.detail)?;
        }
    }
    let fixes: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.status != Status::Pass && f.fix.is_some())
        .collect();
    if !fixes.is_empty() {
        writeln!(out, "\nFixes:")?;
        for f in fixes {
            writeln!(
                out,
                "  {} {}: {}",
                mark(f.status),
                f.id,
                f.fix.as_deref().unwrap_or("")
            )?;
        }
    }
    let (p, w, x) = findings
        .iter()
        .fold((0, 0, 0), |(p, w, x), f| match f.status {
            Status::Pass => (p + 1, w, x),
            Status::Warn => (p, w + 1, x),
            Status::Fail => (p, w, x + 1),
        });
    writeln!(out, "\n{p} passed, {w} warnings, {x} failed")
}
