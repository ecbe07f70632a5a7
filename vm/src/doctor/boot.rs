//! `doctor --boot-probe`: boot a real Linux kernel under KVM with a deadline and say how far it
//! got. On a PVM host a standard kernel hangs early, though the real-mode probe passes; this is
//! the check that shows it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Finding, Status};
use crate::spawn::Supervised;

/// The kernel (and initrd) to boot.
#[derive(Debug, Clone)]
pub struct BootProbe {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub deadline: Duration,
}

/// What the console showed, in order of progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    Nothing,
    /// The kernel's real-mode setup code or decompressor printed, the kernel proper did not.
    SetupCode,
    KernelStarted,
    Userspace,
}

fn progress(text: &str) -> Progress {
    if text.contains("Run /init")
        || text.contains("DRYDOCK-STAGE1")
        || text.contains("Freeing unused kernel")
    {
        Progress::Userspace
    } else if text.contains("Linux version") {
        Progress::KernelStarted
    } else if text.contains("Decompressing")
        || text.contains("early console")
        || text.contains("Probing EDD")
    {
        Progress::SetupCode
    } else {
        Progress::Nothing
    }
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

pub(crate) fn probe(p: &BootProbe, scratch: &Path) -> Finding {
    let id = "kvm.boot";
    let log = scratch.join("boot-probe.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(&p.qemu);
    // QEMU's default CPU model asks the least of the host (`-cpu host` can abort on hosts that
    // refuse some MSRs, as PVM does), so a hang here is the kernel's, not QEMU's.
    let qemu_log = scratch.join("boot-probe.qemu.log");
    let stderr = drydock_gc::create_nofollow(&qemu_log)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    cmd.args(["-accel", "kvm", "-m", "256", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&p.kernel)
        .args([
            "-append",
            "console=ttyS0 earlyprintk=serial panic=-1 loglevel=7",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stderr(stderr);
    if let Some(i) = &p.initrd {
        cmd.arg("-initrd").arg(i);
    }
    let start = Instant::now();
    let mut qemu = match Supervised::spawn("qemu (boot probe)", cmd) {
        Ok(q) => q,
        Err(e) => {
            return Finding::new(
                id,
                Status::Fail,
                format!("cannot start QEMU for the boot probe: {e}"),
            );
        }
    };
    let mut reached;
    let mut text;
    // The serial log is read each time it grows, until userspace, QEMU's exit or the deadline.
    let deadline = drydock_gc::Deadline::at(start + p.deadline);
    let exit = qemu.exit_watch();
    let mut watch = crate::console::LogWatch::new();
    watch.add(&log);
    let exited = loop {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        reached = progress(&text);
        if reached == Progress::Userspace {
            break None;
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            break Some(status);
        }
        if deadline.expired() {
            break None;
        }
        let also: Vec<_> = exit.iter().map(|w| std::os::fd::AsFd::as_fd(w)).collect();
        if watch.wait(&also, Some(deadline)).is_err() {
            break None;
        }
    };
    let elapsed = start.elapsed();
    let _ = qemu.stop(Duration::from_secs(1));
    let _ = std::fs::remove_file(&log);
    let qemu_said = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    let _ = std::fs::remove_file(&qemu_log);
    let kernel = p.kernel.display();
    match (reached, exited) {
        (Progress::Userspace, _) => Finding::new(
            id,
            Status::Pass,
            format!("a Linux kernel booted to userspace under KVM in {:.2} s", elapsed.as_secs_f64()),
        )
        .detail(format!("kernel {kernel}")),
        (_, Some(status)) => Finding::new(id, Status::Fail, format!("QEMU with KVM exited during the boot probe ({status})"))
            .detail(format!("kernel {kernel}; QEMU said: {}", qemu_said.trim()))
            .fix("see the kvm.* findings; run VMs with --accel tcg"),
        (Progress::Nothing, None) => Finding::new(
            id,
            Status::Fail,
            format!("the kernel hung under KVM: no console output in {} s", p.deadline.as_secs()),
        )
        .detail(format!(
            "booted {kernel} with -accel kvm and earlyprintk; nothing reached the serial console. This is what a standard kernel does on a PVM (kvm_pvm) host"
        ))
        .fix("run VMs with --accel tcg (drydock's `auto` does), or use a PVM-enabled guest kernel"),
        (r, None) => Finding::new(
            id,
            Status::Fail,
            format!(
                "the kernel hung under KVM: {} within {} s",
                if r == Progress::KernelStarted { "it started but never reached userspace" } else { "its setup code ran, the kernel proper never printed" },
                p.deadline.as_secs()
            ),
        )
        .detail(format!(
            "kernel {kernel}; last console line: {:?}. A standard kernel does this on a PVM (kvm_pvm) host",
            last_line(&text)
        ))
        .fix("run VMs with --accel tcg (drydock's `auto` does), or use a PVM-enabled guest kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_markers() {
        assert_eq!(progress(""), Progress::Nothing);
        assert_eq!(
            progress("Decompressing Linux... Parsing ELF"),
            Progress::SetupCode
        );
        assert_eq!(
            progress("Probing EDD (edd=off to disable)... ok"),
            Progress::SetupCode
        );
        assert_eq!(
            progress("[0.0] Linux version 6.1.0"),
            Progress::KernelStarted
        );
        assert_eq!(
            progress("Linux version 6\n[1.2] Run /init as init process"),
            Progress::Userspace
        );
        assert_eq!(last_line("a\nb\n\n"), "b");
    }
}
