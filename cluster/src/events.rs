//! What the owner of a cluster reacts to, and the one channel it arrives on. Every source feeds
//! one bounded channel (`sync_channel`), and the owner blocks on it until the next event or its
//! next deadline, so an idle cluster costs its owner nothing:
//!
//! - each machine's thread: ready, failed (its typed [`MachineError`]), stopped
//!   ([`MachineEvent`]; its last event is `Stopped` or `Failed`, sent as the thread ends);
//! - each machine's console pump: every line the guest prints, once ([`OwnerEvent::Console`]);
//! - the control socket's thread: each request of a second `up` or a `vm restart`, read whole;
//! - the watcher's thread under `up --watch`: the files that changed;
//! - the binary's signal handler (through [`drydock_gc::Cancel::on_cancel`]): an interruption.
//!
//! Senders that must not lose their event (a machine's, a control request) block while the
//! channel is full; the owner drains it whenever it waits for anything, and drops its end before
//! it joins them, so none stays blocked. Console lines are never worth blocking a guest for: a
//! line that finds the channel full is not echoed (it is in the machine's logs), and the next
//! one says how many were skipped.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use crate::control::ControlRequest;
use crate::state::MachineError;
use crate::watch::Change;

/// How many events may wait for the owner.
pub(crate) const CAPACITY: usize = 1024;

/// What a machine thread reports.
#[derive(Debug)]
pub enum MachineEvent {
    Ready {
        machine: String,
        after: Duration,
    },
    /// Its error as it happened (shared: the owner reports it and may return it).
    Failed {
        machine: String,
        error: Arc<MachineError>,
    },
    Stopped {
        machine: String,
    },
    /// Restored from a snapshot and paused, its backdoor connected: it waits for the owner to
    /// resume every machine at once.
    Paused {
        machine: String,
    },
}

impl MachineEvent {
    pub fn machine(&self) -> &str {
        match self {
            Self::Ready { machine, .. }
            | Self::Failed { machine, .. }
            | Self::Stopped { machine }
            | Self::Paused { machine } => machine,
        }
    }

    /// Whether it is the machine thread's last (the thread has ended or is ending).
    pub fn is_last(&self) -> bool {
        !matches!(self, Self::Ready { .. } | Self::Paused { .. })
    }
}

/// A request read from the control socket, with the connection its reply goes to.
#[derive(Debug)]
pub(crate) struct ControlCall {
    pub(crate) stream: UnixStream,
    /// The request, or why it could not be read.
    pub(crate) request: Result<ControlRequest, String>,
}

/// One thing for the owner to react to.
#[derive(Debug)]
pub(crate) enum OwnerEvent {
    /// From the machine thread of generation `thread` (a restarted machine has a new one).
    Machine {
        thread: u64,
        event: MachineEvent,
    },
    /// A line machine `machine` printed; `skipped` lines before it were not echoed.
    Console {
        machine: String,
        line: String,
        skipped: u64,
    },
    Control(ControlCall),
    /// Watched files changed (all of them: the owner keeps those that call for a reload).
    Edits(Vec<Change>),
    /// An interruption: the cancel flag is set.
    Interrupt,
}

/// The owner's channel.
pub(crate) fn channel() -> (SyncSender<OwnerEvent>, Receiver<OwnerEvent>) {
    sync_channel(CAPACITY)
}

/// Hands one machine's console lines to the owner without ever blocking the console.
#[derive(Debug)]
pub(crate) struct ConsoleEcho {
    machine: String,
    tx: SyncSender<OwnerEvent>,
    skipped: u64,
}

impl ConsoleEcho {
    pub(crate) fn new(machine: &str, tx: SyncSender<OwnerEvent>) -> Self {
        Self {
            machine: machine.to_string(),
            tx,
            skipped: 0,
        }
    }

    pub(crate) fn line(&mut self, line: &str) {
        let ev = OwnerEvent::Console {
            machine: self.machine.clone(),
            line: line.to_string(),
            skipped: self.skipped,
        };
        match self.tx.try_send(ev) {
            Ok(()) => self.skipped = 0,
            Err(TrySendError::Full(_)) => self.skipped += 1,
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_that_find_the_channel_full_are_counted_not_waited_for() {
        let (tx, rx) = sync_channel(2);
        let mut e = ConsoleEcho::new("m", tx);
        for i in 0..5 {
            e.line(&format!("{i}"));
        }
        let got: Vec<(String, u64)> = rx
            .try_iter()
            .map(|ev| match ev {
                OwnerEvent::Console { line, skipped, .. } => (line, skipped),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [("0".into(), 0), ("1".into(), 0)]);
        e.line("5");
        let OwnerEvent::Console { line, skipped, .. } = rx.try_recv().unwrap() else {
            panic!()
        };
        assert_eq!((line.as_str(), skipped), ("5", 3));
        drop(rx);
        e.line("nobody listens");
    }
}
