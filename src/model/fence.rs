//! The lease fence of a `[cluster]` instance: whether it may still act on the partitions it
//! holds. The cluster supervisor moves it forward after every renewal of its claims; sinks and
//! the state uploader check it before each publish, so an instance that lost its leases (paused,
//! cut off from NATS) stops publishing at once, before another instance can have taken over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Valid until an instant on the monotonic clock, which keeps counting while the process is
/// stopped (SIGSTOP): a process resumed after its leases expired finds the fence closed.
#[derive(Debug)]
pub struct Fence {
    base: Instant,
    /// Microseconds after `base` until which the fence holds; 0: closed.
    until_us: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Self::closed()
    }
}

impl Fence {
    /// A fence that holds nothing until [`Fence::extend_to`] opens it.
    pub fn closed() -> Self {
        Self {
            base: Instant::now(),
            until_us: AtomicU64::new(0),
        }
    }

    /// Holds until `until` (never moves it back: call [`Fence::close`] for that).
    pub fn extend_to(&self, until: Instant) {
        let us = u64::try_from(until.saturating_duration_since(self.base).as_micros())
            .unwrap_or(u64::MAX);
        self.until_us.fetch_max(us, Ordering::AcqRel);
    }

    /// Holds until `until`, earlier than now if need be (a lease was renewed late or lost).
    pub fn set(&self, until: Instant) {
        let us = u64::try_from(until.saturating_duration_since(self.base).as_micros())
            .unwrap_or(u64::MAX);
        self.until_us.store(us, Ordering::Release);
    }

    pub fn close(&self) {
        self.until_us.store(0, Ordering::Release);
    }

    /// Whether the instance may publish now.
    pub fn holds(&self) -> bool {
        let now = self.base.elapsed().as_micros();
        u128::from(self.until_us.load(Ordering::Acquire)) > now
    }

    /// How long it still holds (zero when closed).
    pub fn remaining(&self) -> Duration {
        let until = Duration::from_micros(self.until_us.load(Ordering::Acquire));
        until.saturating_sub(self.base.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_only_until_its_instant() {
        let fence = Fence::closed();
        assert!(!fence.holds());
        fence.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(fence.holds());
        fence.extend_to(Instant::now());
        assert!(fence.holds(), "extend_to never moves it back");
        fence.set(Instant::now());
        assert!(!fence.holds());
        fence.set(Instant::now() + Duration::from_millis(30));
        assert!(fence.holds());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!fence.holds());
        assert_eq!(fence.remaining(), Duration::ZERO);
    }
}
