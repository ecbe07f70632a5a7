//! The binary's one interruption, [`CANCEL`]. Ctrl-C, SIGTERM and SIGHUP (the `ctrlc` crate's
//! `termination` feature) reach one handler, installed for every command at start
//! ([`init`]). A command that stops what it started when interrupted says so with [`install`]:
//! the handler then sets the flag and runs the wake-ups waits registered on it (the libraries
//! take `&Cancel` or its `&AtomicBool`, and never install a process-wide handler); the command
//! cleans up and exits 130. Any other command (one that holds nothing that needs stopping) exits
//! 130 at once.

use std::sync::atomic::{AtomicBool, Ordering};

use drydock_gc::Cancel;

/// Set once a stop was asked for.
pub static CANCEL: Cancel = Cancel::new();

/// Whether the running command handles [`CANCEL`] itself.
static HANDLED: AtomicBool = AtomicBool::new(false);

/// Install the handler (once, before the command runs).
pub fn init() {
    let _ = ctrlc::set_handler(|| {
        if HANDLED.load(Ordering::SeqCst) {
            CANCEL.cancel();
        } else {
            std::process::exit(130);
        }
    });
}

/// This command handles interruptions: from now on they set [`CANCEL`] instead of ending the
/// process.
pub fn install() -> &'static Cancel {
    HANDLED.store(true, Ordering::SeqCst);
    &CANCEL
}
