//! One deadline type for the workspace (drydock-gc is the base crate; drydock-vm re-uses it): a
//! point in time that a wait is bounded by, so that loops say "until the deadline" instead of
//! each doing its own `Instant` arithmetic.

use std::time::{Duration, Instant};

/// A point in time by which a wait must end. Copy it into the loops and helpers it bounds;
/// every wait bounded by it asks [`Deadline::remaining`] (or [`Deadline::timeout`]) again, so
/// the whole sequence, not each step, gets the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

/// How far [`Deadline::after`] goes when the budget does not fit in an `Instant` (e.g.
/// `Duration::MAX`, meaning "no deadline"): about 136 years.
const FAR_FUTURE: Duration = Duration::from_secs(u32::MAX as u64);

impl Deadline {
    /// The deadline `budget` from now. A budget too large to represent is cut to about 136
    /// years, so `Deadline::after(Duration::MAX)` is a deadline that never comes.
    pub fn after(budget: Duration) -> Self {
        let now = Instant::now();
        Self(
            now.checked_add(budget)
                .or_else(|| now.checked_add(FAR_FUTURE))
                .unwrap_or(now),
        )
    }

    /// The deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// The point in time.
    pub fn instant(self) -> Instant {
        self.0
    }

    /// The time left, zero once the deadline has passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed (no time is left).
    pub fn expired(self) -> bool {
        self.remaining().is_zero()
    }

    /// The time left as the argument of a timed wait that must not be given zero
    /// (`set_read_timeout`, `set_write_timeout` refuse `Some(ZERO)`; `recv_timeout(ZERO)` only
    /// polls): `None` once the deadline has passed, which the caller treats as "expired".
    pub fn timeout(self) -> Option<Duration> {
        Some(self.remaining()).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_in_the_future_has_time_left() {
        let d = Deadline::after(Duration::from_secs(3600));
        assert!(!d.expired());
        let left = d.remaining();
        assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
        assert_eq!(d.timeout().map(|t| t > Duration::ZERO), Some(true));
        assert_eq!(Deadline::at(d.instant()), d);
    }

    #[test]
    fn a_passed_deadline_is_expired_and_saturates_at_zero() {
        let past = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        let d = Deadline::at(past);
        assert!(d.expired());
        assert_eq!(d.remaining(), Duration::ZERO);
        assert_eq!(d.timeout(), None);
        let zero = Deadline::after(Duration::ZERO);
        assert!(zero.expired());
        assert_eq!(zero.timeout(), None);
    }

    #[test]
    fn no_deadline_does_not_overflow_and_the_earliest_wins() {
        let never = Deadline::after(Duration::MAX);
        assert!(!never.expired());
        assert!(never.remaining() > Duration::from_secs(100 * 365 * 86400));
        let soon = Deadline::after(Duration::from_millis(10));
        assert_eq!(never.min(soon), soon);
        assert!(soon < never);
    }
}
