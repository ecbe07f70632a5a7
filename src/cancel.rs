//! The binary's one Ctrl-C flag. Ctrl-C, SIGTERM and SIGHUP set it (the `ctrlc` crate's
//! `termination` feature); the libraries poll it (`&AtomicBool` parameters) and never install
//! a process-wide handler themselves. A command that sees it cleans up and exits 130.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a stop was asked for.
pub static CANCEL: AtomicBool = AtomicBool::new(false);

/// Install the handler (once per process; a second call is harmless).
pub fn install() -> &'static AtomicBool {
    let _ = ctrlc::set_handler(|| CANCEL.store(true, Ordering::SeqCst));
    &CANCEL
}
