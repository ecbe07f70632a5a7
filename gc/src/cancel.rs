//! One interruption type for the workspace: the flag the binary's signal handler sets (Ctrl-C,
//! SIGTERM, SIGHUP), and what waits that cannot look at a flag do to be woken by it. A flag
//! alone forces every wait that must end on Ctrl-C to look at it now and then; a blocked wait
//! (a `recv` on a channel, a `poll` on sockets, a read) instead registers a wake-up with
//! [`Cancel::on_cancel`] that unblocks it (sends an event, closes a pipe, shuts a socket down)
//! once, when the flag is set.
//!
//! `Cancel` dereferences to its [`AtomicBool`], so the functions that only look at the flag
//! keep taking `&AtomicBool`. The libraries install no signal handler: the binary's handler
//! calls [`Cancel::cancel`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

type Wake = Arc<dyn Fn() + Send + Sync>;

/// A flag that, once set, also runs the wake-ups registered for it.
pub struct Cancel {
    flag: AtomicBool,
    next: AtomicU64,
    wakes: Mutex<Vec<(u64, Wake)>>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("set", &self.flag.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Default for Cancel {
    fn default() -> Self {
        Self::new()
    }
}

impl Cancel {
    /// Not set, nothing registered (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            flag: AtomicBool::new(false),
            next: AtomicU64::new(0),
            wakes: Mutex::new(Vec::new()),
        }
    }

    /// Set the flag and run every registered wake-up (each registration runs at most once per
    /// call; a wake-up must not block).
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let wakes: Vec<Wake> = self
            .wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(_, w)| w.clone())
            .collect();
        for w in wakes {
            w();
        }
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Run `wake` when the flag is set, for as long as the returned guard lives; at once if it
    /// is set already. `wake` runs on the thread that sets the flag (the binary's signal
    /// handler thread): it must only unblock a wait, never block itself.
    pub fn on_cancel(&self, wake: impl Fn() + Send + Sync + 'static) -> OnCancel<'_> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let wake: Wake = Arc::new(wake);
        self.wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((id, wake.clone()));
        if self.is_set() {
            wake();
        }
        OnCancel { cancel: self, id }
    }
}

impl std::ops::Deref for Cancel {
    type Target = AtomicBool;
    fn deref(&self) -> &AtomicBool {
        &self.flag
    }
}

/// A registered wake-up; dropping it unregisters it.
#[must_use = "the wake-up is unregistered when this is dropped"]
#[derive(Debug)]
pub struct OnCancel<'a> {
    cancel: &'a Cancel,
    id: u64,
}

impl Drop for OnCancel<'_> {
    fn drop(&mut self) {
        self.cancel
            .wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn a_wake_up_runs_once_per_cancel_while_registered() {
        let c = Cancel::new();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let guard = c.on_cancel(move || {
            n2.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!c.is_set());
        c.cancel();
        assert!(c.is_set() && c.load(Ordering::SeqCst));
        assert_eq!(n.load(Ordering::SeqCst), 1);
        drop(guard);
        c.cancel();
        assert_eq!(n.load(Ordering::SeqCst), 1, "unregistered");
    }

    #[test]
    fn registering_after_the_cancel_wakes_at_once() {
        let c = Cancel::new();
        c.cancel();
        let (tx, rx) = std::sync::mpsc::channel();
        let _g = c.on_cancel(move || {
            let _ = tx.send(());
        });
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn the_flag_is_an_atomic_bool_for_those_that_only_look() {
        fn looks(f: &AtomicBool) -> bool {
            f.load(Ordering::SeqCst)
        }
        let c = Cancel::new();
        assert!(!looks(&c));
        c.cancel();
        assert!(looks(&c));
        // A consumer may take the flag back (track forwards one Ctrl-C, then waits for the next).
        assert!(c.swap(false, Ordering::SeqCst));
        assert!(!c.is_set());
    }
}
