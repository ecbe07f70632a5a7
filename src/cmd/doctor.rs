//! `drydock doctor`: run the preflight checks and print them as a table (or JSON), then the
//! fixes. Exit 1 when any check fails.

use std::io::{IsTerminal, Write};

use std::path::PathBuf;

use drydock_gc::NixConfSources;
use drydock_vm::{BootProbe, DoctorOptions, Finding, Host, Status};

use crate::cli::DoctorArgs;
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

/// `doctor --json`.
#[derive(Debug, serde::Serialize)]
struct DoctorReport<'a> {
    checks: &'a [Finding],
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
    let findings = drydock_vm::run_checks(&host, &opts)?;
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, &DoctorReport { checks: &findings })?;
    } else {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        render(&mut out, &findings, colour)?;
    }
    Ok(match drydock_vm::overall(&findings) {
        Status::Fail => Outcome::Failed,
        _ => Outcome::Success,
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

fn render(out: &mut impl Write, findings: &[Finding], colour: bool) -> std::io::Result<()> {
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
