//! Running a Nix command (`nix-store --delete`, `nix-store --init`) with a deadline: no input,
//! stdout dropped, stderr kept for the message, killed when it is late.

use std::process::{Command, Stdio};

use crate::child::ExitWatch;
use crate::deadline::Deadline;

/// Run the Nix command `cmd` (no input, stdout dropped) until it exits or `deadline` passes,
/// when it is killed: its status and what it printed on stderr, or `None` if it was late.
pub fn run_nix(
    mut cmd: Command,
    deadline: Deadline,
) -> std::io::Result<Option<(std::process::ExitStatus, String)>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(e) = err.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut text);
        }
        text
    });
    let watch = ExitWatch::start(&child);
    if !watch.wait_until(deadline) {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(None);
    }
    let status = child.wait()?;
    Ok(Some((status, reader.join().unwrap_or_default())))
}
